"""The running app: the runtime that owns the store and model servers, the chat service and the control API."""
