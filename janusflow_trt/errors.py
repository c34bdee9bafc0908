"""User-facing errors: one clear line, exit code 2 (see cli.main)."""


class JanusFlowError(Exception):
    """A problem with what the user gave us (files, config, arguments). Printed as one line, exit 2."""


class CheckpointError(JanusFlowError):
    """Missing, corrupt or mismatched checkpoint files."""


class InputError(JanusFlowError):
    """Bad runtime input: image, prompt, numbers."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread by cli.main's handler so that every cleanup that
    runs for Ctrl-C (temporaries removed, old outputs kept) runs for them too."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
