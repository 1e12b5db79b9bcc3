"""The committed reference (robustq/reference.py): written from the claim records and downloads,
compared line by line, every difference printed, and the build fails on one."""

import json

import pytest

from robustq import reference, verdicts


def _records():
    claim = verdicts.Claim("01", "C1.1", "SymReg beats the baseline", "w432", "paired", 1.0)
    candidate, base = {0: 3.0, 1: 4.0, 2: 5.0}, {0: 0.0, 1: 0.5, 2: 0.25}
    record = verdicts.claim_record(claim, claim.grade(candidate, base), 2.5)
    return [{**record, **verdicts.seed_record(claim, candidate, base)}]


def _files(tmp_path, records):
    findings, downloads = tmp_path / "findings", tmp_path / "downloads"
    findings.mkdir(exist_ok=True)
    downloads.mkdir(exist_ok=True)
    (findings / "01_x.json").write_text(json.dumps(records))
    (downloads / "01_x_accuracy.csv").write_text("method,acc\nbaseline,87.18\n")
    (downloads / "02_y_accuracy.csv").write_text("method,acc\nsymreg,88.0\n")  # not executed
    return reference.snapshot(findings, downloads, ["01_x"])


def test_snapshot_holds_each_seed_and_the_chapters_downloads_only(tmp_path):
    files = _files(tmp_path, _records())
    assert sorted(files) == ["01_x.tsv", "01_x_accuracy.csv"]
    lines = files["01_x.tsv"].splitlines()
    assert "C1.1\tcandidate\t2\t5.0" in lines and "C1.1\treference\t1\t0.5" in lines
    assert "C1.1\tgrade\t-\treproduced" in lines and "C1.1\tleave_one_out\t0\tinconclusive" in lines


def test_an_unchanged_build_equals_the_written_reference(tmp_path):
    files = _files(tmp_path, _records())
    folder = tmp_path / "reference"
    assert sorted(reference.write(folder, files)) == sorted(files)
    assert reference.write(folder, files) == []  # nothing changed: nothing rewritten
    assert reference.differences(folder, files) == []


def test_each_changed_number_is_printed_and_a_missing_file_is_named(tmp_path):
    folder = tmp_path / "reference"
    reference.write(folder, _files(tmp_path, _records()))
    records = _records()
    records[0]["candidate"]["2"] = 5.000000000000001  # one ulp
    lines = reference.differences(folder, {**_files(tmp_path, records), "08_new.tsv": "claim\n"})
    assert "-C1.1\tcandidate\t2\t5.0" in lines and "+C1.1\tcandidate\t2\t5.000000000000001" in lines
    assert lines[-1].endswith("08_new.tsv: not in the reference (run make book outside CI and commit it)")


def test_the_mode_is_compare_under_ci_and_a_bad_value_names_the_choices():
    assert reference.mode({"CI": "false"}) == "write"
    with pytest.raises(ValueError, match="is not one of write, compare, off"):
        reference.mode({"ROBUSTQ_REFERENCE": "update"})


def test_a_claims_ceiling_gets_a_line_per_seed_after_its_grades():
    claim = verdicts.Claim("01", "C1.1", "SymReg beats the baseline", "w432", "paired", 1.0)
    candidate, base = {0: 3.0, 1: 4.0}, {0: 0.0, 1: 0.5}
    record = {**verdicts.claim_record(claim, claim.grade(candidate, base), 2.5),
              **verdicts.seed_record(claim, candidate, base, {0: 5.0, 1: 5.5})}
    lines = reference.claim_lines([record]).splitlines()
    assert lines[-2:] == ["C1.1\tceiling\t0\t5.0", "C1.1\tceiling\t1\t5.5"]
    assert lines[-3].startswith("C1.1\tleave_one_out\t1\t")
