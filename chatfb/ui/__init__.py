"""The Gradio UI: the chat tab, the admin tab and the admin login throttle."""
