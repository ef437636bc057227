"""Prints each fuzz target's inputs and rate at the end of the run."""
from tests.fuzz.budget import RATES


def pytest_terminal_summary(terminalreporter):
    if not RATES:
        return
    terminalreporter.section("fuzz targets")
    for target, (count, seconds) in sorted(RATES.items()):
        rate = count / seconds if seconds else 0.0
        terminalreporter.write_line(f"{target}: {int(count)} inputs in {seconds:.1f} s ({rate:,.0f}/s)")
