"""User-facing errors.

`PointAvatarError` is raised for problems the user can fix (a missing file, a bad conf key, malformed
data). Entry points catch it and print its message alone, without a traceback.
"""


class PointAvatarError(Exception):
    """A problem with the user's input: the message names the file or key and the fix."""
