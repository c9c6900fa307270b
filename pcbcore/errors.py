"""The one exception type for bad input.

Every refusal of user input raises `MergeInputError` with one sentence that names the file or key at fault,
what was given and what is allowed. The CLI prints it and exits non-zero; nothing else catches it.
"""


class MergeInputError(ValueError):
    """Bad input from the user: a config key, a checkpoint, a path. The message is one clear sentence."""
