"""The one exception type of the data layer."""


class DataError(ValueError):
    """Malformed or inconsistent input data.

    The message always names the file, and where it applies the line, column and cell, and says
    how to fix the problem.
    """

    def __init__(self, path, problem: str, fix: str, *, where: str | None = None):
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        self.where = where
        loc = f"{self.path}" + (f", {where}" if where else "")
        super().__init__(f"{loc}: {problem} Fix: {fix}")
