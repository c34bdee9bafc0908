"""User-facing errors: one clear line, exit code 2 (see cli.main)."""


class JanusFlowError(Exception):
    """A problem with what the user gave us (files, config, arguments). Printed as one line, exit 2."""


class CheckpointError(JanusFlowError):
    """Missing, corrupt or mismatched checkpoint files."""


class InputError(JanusFlowError):
    """Bad runtime input: image, prompt, numbers."""
