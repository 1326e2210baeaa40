"""The one exception type for bad user input (config, data, model folder).

The CLI prints its message and exits 2, with no traceback.
"""


class UserInputError(Exception):
    """Bad input from the user: the message names the file, key or value and what was expected."""
