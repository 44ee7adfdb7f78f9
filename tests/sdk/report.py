"""What the SDK scripts share: one line per check, and an exit status that says whether all held."""
import sys

failures = []


def check(what, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + what + (f": {detail}" if not ok else ""))
    if not ok:
        failures.append(what)


def finish():
    sys.exit(1 if failures else 0)
