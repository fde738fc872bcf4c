"""What API clients (gradio_client, the "Use via API" page) are told a picker takes and returns.

A dropdown or checkbox group whose choices are filled in per session (a user's guidelines, the admin's
review rows) is built with no choices, so Gradio describes it as `Literal[]`: a type no value fits.
To a client it takes the id of a choice: a string (or a list of them).
"""

from __future__ import annotations


def takes_ids(picker, many: bool = False):
    """Describe `picker` to API clients as taking (and returning) an id string, or a list of them."""
    json_type = {"type": "array", "items": {"type": "string"}} if many else {"type": "string"}
    picker.api_info_as_input = picker.api_info_as_output = lambda: json_type
    return picker
