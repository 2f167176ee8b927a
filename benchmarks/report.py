"""A benchmark's printed lines, kept so that --out can write the same text to a results file."""
import sys


class Report:
    """Call it with a line to print it and keep it; write() saves every line kept."""

    def __init__(self, name):
        self.name = name  # the script's tag in the "wrote" message
        self.lines = []

    def __call__(self, line=""):
        print(line, flush=True)
        self.lines.append(line)

    def write(self, path):
        """Writes the lines to `path` (nothing when it is None or empty)."""
        if not path:
            return
        with open(path, "w") as f:
            f.write("\n".join(self.lines) + "\n")
        print(f"[{self.name}] wrote {path}", file=sys.stderr)
