"""The answer file: the replay and control answers every child of a cycle, and the next cycles, need are asked once."""

from chatfb.learning.answers import AnswerBook, model_identity

Q = [[{"role": "user", "content": f"Question {i}?"}] for i in range(3)]


def asker(log, model="m"):
    def ask(prompts):
        log.extend(p[-1]["content"] for p in prompts)
        return [f"{model} answers {p[-1]['content']}" for p in prompts]
    return ask


def test_a_second_child_of_the_cycle_reads_what_the_first_asked(tmp_path):
    path, asked = tmp_path / "answers.json", []
    first = AnswerBook(path).answers("greedy", "m", Q[:2], 128, asker(asked))
    assert asked == ["Question 0?", "Question 1?"]
    second = AnswerBook(path)
    assert second.answers("greedy", "m", Q, 128, asker(asked)) == [*first, "m answers Question 2?"]
    assert asked[2:] == ["Question 2?"] and (second.hits, second.asked) == (2, 1)


def test_another_model_length_kind_or_merged_weights_is_asked_again(tmp_path):
    path = tmp_path / "answers.json"
    AnswerBook(path).answers("greedy", "m", Q, 128, asker([]))
    for book, kind, model, tokens in [(AnswerBook(path), "greedy", "other", 128), (AnswerBook(path), "greedy", "m", 64),
                                      (AnswerBook(path), "finished", "m", 128),
                                      (AnswerBook(path, merged="chatfb-v0002"), "greedy", "m", 128)]:
        asked = []
        book.answers(kind, model, Q, tokens, asker(asked, model))
        assert len(asked) == 3, (kind, model, tokens, book.merged)


def test_a_torn_file_or_none_costs_a_question_never_the_cycle(tmp_path):
    path = tmp_path / "answers.json"
    path.write_text('{"half')
    asked = []
    assert AnswerBook(path).answers("greedy", "m", Q, 128, asker(asked)) == [f"m answers Question {i}?" for i in range(3)]
    assert len(asked) == 3 and AnswerBook(path).answers("greedy", "m", Q, 128, asker(asked)) and len(asked) == 3
    asked = []
    AnswerBook(None).answers("greedy", "m", Q, 128, asker(asked))
    AnswerBook(None).answers("greedy", "m", Q, 128, asker(asked))
    assert len(asked) == 6  # nothing kept without a file


def test_only_the_models_it_may_keep_are_filed(tmp_path):
    """A personal adapter's answers never go in the cycle's file (trained on one user's rows, they may repeat
    them): they are asked every time."""
    from chatfb.serving.adapters import is_personal

    path, asked = tmp_path / "answers.json", []
    personal = "chatfb-u0123456789-v0002"
    for _ in range(2):
        AnswerBook(path, keep=lambda m: not is_personal(m)).answers("greedy", personal, Q, 128, asker(asked, personal))
    assert len(asked) == 6 and not path.exists()
    AnswerBook(path, keep=lambda m: not is_personal(m)).answers("greedy", "chatfb-v0002", Q, 128, asker(asked, "chatfb-v0002"))
    assert personal not in path.read_text() and "chatfb-v0002 answers" in path.read_text()


def test_answers_filed_from_two_threads_at_once_are_both_kept(tmp_path):
    """The gate asks several models' answers at once: one thread's filing never drops another's."""
    import threading

    path = tmp_path / "answers.json"
    b_filed = threading.Event()

    def slow(prompts):  # answers only once the other thread has filed its own
        assert b_filed.wait(10)
        return asker([], "a")(prompts)

    book = AnswerBook(path)
    first = threading.Thread(target=book.answers, args=("greedy", "a", Q, 128, slow))
    first.start()
    book.answers("greedy", "b", Q, 128, asker([], "b"))
    b_filed.set()
    first.join(10)
    asked = []
    for model in ("a", "b"):
        AnswerBook(path).answers("greedy", model, Q, 128, asker(asked, model))
    assert asked == [] and (book.hits, book.asked) == (0, 6)


def test_another_base_model_is_asked_again(tmp_path):
    """Across cycles the file outlives a model swap (CHATFB_MODEL): one base model's answers are never another's."""
    path, asked = tmp_path / "answers.json", []
    a, b = tmp_path / "model-a", tmp_path / "model-b"
    for folder, layers in ((a, 30), (b, 32)):
        folder.mkdir()
        (folder / "config.json").write_text(f'{{"num_hidden_layers": {layers}}}')
        (folder / "model.safetensors").write_bytes(b"0" * layers)
    assert model_identity(a) != model_identity(b) and model_identity(a) == model_identity(tmp_path / "model-a")
    AnswerBook(path, base_id=model_identity(a)).answers("greedy", "chatfb-base", Q, 128, asker(asked))
    AnswerBook(path, base_id=model_identity(a)).answers("greedy", "chatfb-base", Q, 128, asker(asked))
    assert len(asked) == 3
    AnswerBook(path, base_id=model_identity(b)).answers("greedy", "chatfb-base", Q, 128, asker(asked))
    assert len(asked) == 6
    import os

    before = model_identity(a)
    (a / "model.safetensors").write_bytes(b"1" * 30)  # the same folder and size, other weights
    os.utime(a / "model.safetensors", ns=(1, 1))
    assert model_identity(a) != before
    (a / "model.safetensors").write_bytes(b"0" * 30)
    os.utime(a / "model.safetensors", ns=(1, 1))
    (a / "generation_config.json").write_text('{"temperature": 0.2}')  # vLLM applies it by default
    assert model_identity(a) != model_identity(a, "float32") and len({model_identity(a), before}) == 2
    book = AnswerBook(path)
    assert book.keep_base(model_identity(b)) == 3 and len(book._read()) == 3  # model-a's went


def test_a_cycle_keeps_the_base_and_live_answers_and_delete_user_drops_an_adapters(tmp_path):
    path = tmp_path / "answers.json"
    for model in ("chatfb-base", "chatfb-v0001", "chatfb-v0002"):
        AnswerBook(path).answers("greedy", model, Q, 128, asker([], model))
    AnswerBook(path, merged="chatfb-v0001").answers("greedy", "chatfb-base", Q, 128, asker([]))  # on merged weights
    assert AnswerBook(path).keep_only({"chatfb-base", "chatfb-v0002"}) == 6  # v0001 no longer live, nor merged in
    asked = []
    for model in ("chatfb-base", "chatfb-v0002"):
        AnswerBook(path).answers("greedy", model, Q, 128, asker(asked, model))
    assert asked == []
    assert AnswerBook(path).forget({"chatfb-v0002"}) == 3 and "chatfb-v0002" not in path.read_text()
    AnswerBook(path).answers("greedy", "chatfb-v0002", Q, 128, asker(asked, "chatfb-v0002"))
    assert len(asked) == 3
    path.write_text('{"an older file": "its answer"}')  # the per-cycle form before: ignored, asked again
    assert AnswerBook(path).answers("greedy", "chatfb-base", Q[:1], 128, asker(asked)) == ["m answers Question 0?"]
