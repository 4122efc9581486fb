"""The README's "Model families" support matrix lists exactly the families tests/test_families.py runs."""

import re
from pathlib import Path

from family_models import FAMILIES

README = Path(__file__).resolve().parent.parent / "README.md"
STATUS = {True: "token-identical", False: "refused"}


def _family_matrix() -> list[tuple[str, str, str]]:
    """(family, status, notes) rows of the table under "### Model families" in "## Support matrix"."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Support matrix\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Support matrix' section"
    families = re.search(r"^### Model families\n(.*?)(?=^#|\Z)", section.group(1), re.S | re.M)
    assert families, "the support matrix has no '### Model families' subsection"
    lines = [line.strip() for line in families.group(1).splitlines() if line.strip().startswith("|")]
    assert lines and [cell.strip() for cell in lines[0].strip("|").split("|")] == ["family", "status", "notes"]
    assert set(lines[1]) <= set("|-: "), "the header must be followed by the separator row"
    rows = []
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == 3, f"malformed row: {line}"
        rows.append(tuple(cells))
    return rows


def test_matrix_lists_exactly_the_tested_families_with_their_status():
    rows = _family_matrix()
    names = [name for name, _, _ in rows]
    assert len(names) == len(set(names)), "a family is listed twice"
    documented = {name: status for name, status, _ in rows}
    tested = {family.name: STATUS[family.supported] for family in FAMILIES}
    assert documented == tested


def test_refused_rows_give_the_reason_the_tests_check():
    notes = {name: note for name, _, note in _family_matrix()}
    for family in FAMILIES:
        if not family.supported:
            assert family.refused_because in notes[family.name], (family.name, notes[family.name])


def test_statuses_are_the_two_known_ones():
    assert {status for _, status, _ in _family_matrix()} <= set(STATUS.values())
