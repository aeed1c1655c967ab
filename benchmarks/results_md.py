"""RESULTS.md is one page written partly by hand and partly by the benchmarks: each generator owns
one block between its begin/end markers and replaces only that block, keeping everything else."""

from __future__ import annotations

from pathlib import Path

RESULTS_MD = Path(__file__).parent / "RESULTS.md"


def md_table(header: list[str], rows: list[list[object]]) -> list[str]:
    """A markdown table's lines: the header, its separator, one line per row (cells as given)."""
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header), *(f"| {' | '.join(map(str, r))} |" for r in rows)]


def markers(name: str) -> tuple[str, str]:
    return f"<!-- benchmarks.{name}: begin (generated) -->", f"<!-- benchmarks.{name}: end -->"


def replace_block(name: str, body: str, path: Path = RESULTS_MD) -> None:
    """Put `body` between the `name` markers of `path` (appended at the end the first time)."""
    begin, end = markers(name)
    block = f"{begin}\n{body.strip()}\n{end}"
    old = path.read_text() if path.exists() else "# devft benchmark results\n"
    if begin in old and end in old.split(begin, 1)[1]:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    write_atomic(path, new)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temp file beside `path`, then rename it over `path`: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save_figure(fig, path: Path, title: str) -> None:
    """Title a benchmark's figure, lay it out, write it as a PNG and free it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
