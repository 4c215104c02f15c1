"""The report folder: results.json round-trips, report.md tables and gates, PNG plots or a stated skip."""

import dataclasses
import json
import os

import numpy as np
import pytest

from doc2atom_jax.errors import UserError
from doc2atom_jax.eval import report
from doc2atom_jax.eval.aggregate import QuestionRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS = ("no_context", "in_context", "doc2atom", "always_refuse")
COSTS = {
    "bytes_per_document": {"doc2atom": {"codes": 12_345, "factors": 456_789}, "in_context": {"kv_cache": 2_000_000}},
    "internalize_seconds": {"doc2atom": 0.25},
    "answer_seconds": {"doc2atom": 0.04, "in_context": 0.09},
    "latency_by_length": {"doc2atom": [[256, 0.04], [1024, 0.041]], "in_context": [[256, 0.05], [1024, 0.12]]},
}


@pytest.fixture(autouse=True)
def _no_jax(monkeypatch):
  monkeypatch.setattr(report, "_jax_devices", lambda: "[CpuDevice(id=0)]")


def _records(*, facts: bool = True, qa_labels: bool = True) -> list[QuestionRecord]:
  """A synthetic dataset (facts, worlds, templates, evidence) and a QA one, for METHODS; in_context beats
  no_context. Answer categories: synthetic question 1 a name, 0 and 2 numbers; QA answers other."""
  rng = np.random.default_rng(0)
  out = []
  for dataset in ("syn", "qa"):
    for d in range(6):
      for q in range(4):
        unanswerable = q == 3
        kind = ("out_of_scope" if dataset == "syn" else "unanswerable") if unanswerable else "single"
        refs = ["unknown"] if dataset == "syn" and unanswerable else ([] if unanswerable else [f"ans{q}"])
        base = 3.0 + rng.normal(scale=0.2)
        common = {"dataset": dataset, "doc_id": f"{dataset}{d}", "qid": f"{dataset}{d}-{q}", "kind": kind,
                  "answerable": not unanswerable, "references": refs, "doc_tokens": 200 * (d + 1),
                  "facts": (4 + d) if dataset == "syn" and facts else None,
                  "world": ("seen" if d % 2 else "unseen") if dataset == "syn" else None,
                  "templates": ("unseen" if d == 4 else "seen") if dataset == "syn" else None,
                  "category": None if unanswerable else ("other" if dataset == "qa" else "name" if q == 1 else "number"),
                  "evidence": [q] if not unanswerable and (dataset == "syn" or qa_labels) else None}
        answers = {
            "no_context": ("something", base, 1.0, None),
            "in_context": ("unknown" if unanswerable else f"ans{q}", base - 2.0, 0.0, None),
            "doc2atom": ("unknown" if unanswerable else f"ans{q}" if d % 2 else "wrong", base - 1.0, 0.3,
                         [q, (q + 1) % 4]),
            "always_refuse": ("I don't know.", base + 0.5, 1.5, None),
        }
        for method in METHODS:
          pred, nll, kl, routed = answers[method]
          out.append(QuestionRecord(method=method, prediction=pred, nll=None if unanswerable else nll,
                                    kl=None if unanswerable else kl, routed=routed, **common))
  return out


def _write(tmp_path, records=None, **kw):
  kw.setdefault("costs", None)
  kw.setdefault("n_resamples", 200)
  report.write_report(tmp_path, records if records is not None else _records(), config={"eval": {"k": 4}},
                      meta=kw.pop("meta", {"note": "test"}), **kw)
  return (tmp_path / "report.md").read_text()


def _table_row(md: str, title: str, *cells: str) -> dict[str, str]:
  """The row of the table under `## title` whose first cells are `cells`, as {column: cell}."""
  section = md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
  lines = [line for line in section.splitlines() if line.startswith("|")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  for line in lines[2:]:
    row = [c.strip() for c in line.strip("|").split("|")]
    if tuple(row[:len(cells)]) == cells:
      return dict(zip(header, row))
  raise AssertionError(f"no row {cells} under {title}")


def _strict_json(text: str):
  def reject(name):
    raise ValueError(f"non-standard JSON constant {name}")
  return json.loads(text, parse_constant=reject)


def test_write_report_files(tmp_path):
  records = _records()
  md = _write(tmp_path, records)
  results = _strict_json((tmp_path / "results.json").read_text())
  assert set(results) >= {"meta", "config", "tables", "gates", "costs", "records", "plots"}
  assert results["config"] == {"eval": {"k": 4}} and results["costs"] is None
  assert results["meta"]["note"] == "test" and results["meta"]["machine"]["cpu_count"] >= 1
  assert isinstance(results["meta"]["git_revision"], str)
  assert len(results["tables"]["by_dataset"]) == len(METHODS) * 2
  assert report.load_records(tmp_path) == records
  for name in ("metrics_by_method.png", "interference.png"):
    assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert f"]({name})" in md
  assert not (tmp_path / "f1_vs_bytes.png").exists() and not (tmp_path / "latency_vs_length.png").exists()
  assert "F1 vs bytes per document: skipped — no costs given" in md
  assert "Answer latency vs document length: skipped — no costs given" in md
  assert "No costs given" in md
  assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_main_table_numbers(tmp_path):
  md = _write(tmp_path)
  refuse = _table_row(md, "Main table: method × dataset", "syn", "always_refuse")
  assert refuse["refusal"] == "1.000 [1.000, 1.000] (n=6)"
  assert refuse["false refusal"] == "1.000 [1.000, 1.000] (n=18)"
  assert refuse["F1"].startswith("0.000 ")
  in_context = _table_row(md, "Main table: method × dataset", "qa", "in_context")
  assert in_context["F1"] == "1.000 [1.000, 1.000]" and in_context["KL/token"] == "0.000 [0.000, 0.000]"
  assert in_context["false refusal"].startswith("0.000 ") and in_context["routing p@1"] == "—"
  # doc2atom answers right on odd documents only: F1 1/2; routes the evidence atom first: p@1 = 1.
  doc2atom = _table_row(md, "Main table: method × dataset", "syn", "doc2atom")
  assert doc2atom["F1"].startswith("0.500 ") and doc2atom["routing p@1"].startswith("1.000 ")
  assert _table_row(md, "Routing", "syn", "doc2atom")["r@4"].startswith("1.000 ")
  overall = _table_row(md, "Overall: all datasets pooled", "always_refuse")
  assert overall["n"] == "48" and overall["docs"] == "12" and overall["false refusal"].startswith("1.000")
  assert _table_row(md, "By facts per document", "syn", "[8, 16)", "doc2atom")["n"] == "8"  # facts 8, 9
  assert _table_row(md, "By world (seen / unseen during training)", "syn", "seen", "doc2atom")["n"] == "12"


def test_category_kind_and_templates_tables(tmp_path):
  md = _write(tmp_path)
  results = _strict_json((tmp_path / "results.json").read_text())
  assert {"by_kind", "by_category", "by_templates"} <= set(results["tables"])
  # doc2atom answers right on odd documents only, whatever the category: F1 1/2 for names and numbers alike.
  name = _table_row(md, "By answer category", "syn", "name", "doc2atom")
  assert name["n"] == "6" and name["F1"].startswith("0.500 ") and name["teacher-forced EM"] == "—"
  assert "refusal" not in name and name["false refusal"].startswith("0.000 ")  # no out-of-scope category
  assert name["NLL/token"] != "—" and name["KL/token"] != "—" and name["EM"].startswith("0.500 ")
  assert _table_row(md, "By answer category", "syn", "number", "doc2atom")["n"] == "12"
  assert _table_row(md, "By answer category", "qa", "other", "in_context")["F1"] == "1.000 [1.000, 1.000]"
  assert "out-of-scope questions are under refusal" in md
  assert "| syn | out_of_scope |" not in md.split("## By answer category\n", 1)[1].split("\n## ", 1)[0]
  refuse = _table_row(md, "By question kind", "syn", "out_of_scope", "always_refuse")
  assert refuse["refusal"] == "1.000 [1.000, 1.000] (n=6)" and refuse["F1"] == "—"
  assert _table_row(md, "By question kind", "syn", "single", "in_context")["EM"] == "1.000 [1.000, 1.000]"
  # The held-out wording is its own row beside the unseen worlds in training's wording.
  title = "By templates (synthetic worlds written in training's wording / in held-out wording)"
  assert _table_row(md, title, "syn", "unseen", "unseen", "doc2atom")["n"] == "4"  # document 4 only
  assert _table_row(md, title, "syn", "unseen", "seen", "doc2atom")["n"] == "8"
  assert _table_row(md, title, "syn", "seen", "seen", "doc2atom")["n"] == "12"
  assert "teacher-forced EM" in _table_row(md, "Main table: method × dataset", "syn", "doc2atom")


def test_gates_section(tmp_path):
  md = _write(tmp_path, min_documents=1)
  gates = md.split("## Gates\n", 1)[1].split("\n## ", 1)[0]
  assert "None fired." in gates
  # With the default of 5 documents, bins holding fewer flag: no claim from one document's bootstrap.
  md = _write(tmp_path)
  results = _strict_json((tmp_path / "results.json").read_text())
  assert {(f["table"], f["cell"]["dataset"]) for f in results["gates"]} >= {("by_length", "syn"), ("by_world", "syn")}
  assert all(f["table"] != "by_dataset" for f in results["gates"])
  assert "**instrument**, dataset=syn, length=[0, 256) (table by_length): only 1 document(s)" in md
  # Make in_context no better than no_context on the QA dataset: every QA cell flags, synthetic ones do not.
  records = [dataclasses.replace(r, nll=r.nll + 2.0) if r.method == "in_context" and r.dataset == "qa"
             and r.nll is not None else r for r in _records()]
  md = _write(tmp_path, records, min_documents=1)
  gates = md.split("## Gates\n", 1)[1].split("\n## ", 1)[0]
  assert "**instrument**, dataset=qa (table by_dataset): in_context is not clearly better" in gates
  assert "dataset=syn" not in gates
  assert _table_row(md, "Main table: method × dataset", "qa", "doc2atom")["gate"] == "no claim"
  assert _table_row(md, "Main table: method × dataset", "syn", "doc2atom")["gate"] == ""
  results = _strict_json((tmp_path / "results.json").read_text())
  assert {f["cell"]["dataset"] for f in results["gates"]} == {"qa"}


def test_label_coverage_gate_hides_routing(tmp_path):
  md = _write(tmp_path, _records(qa_labels=False))
  assert "**label coverage**, dataset `qa`" in md
  assert _table_row(md, "Main table: method × dataset", "qa", "doc2atom")["routing p@1"] == "not reported"
  assert _table_row(md, "Main table: method × dataset", "syn", "doc2atom")["routing p@1"].startswith("1.000")


def test_costs_table_and_plots(tmp_path):
  md = _write(tmp_path, costs=COSTS)
  for name in ("metrics_by_method.png", "interference.png", "f1_vs_bytes.png", "latency_vs_length.png"):
    assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
  row = _table_row(md, "Costs", "doc2atom")
  assert row["bytes/doc (codes)"] == "12,345 (12.1 KiB)" and row["bytes/doc (factors)"] == "456,789 (446.1 KiB)"
  assert row["internalize / doc"] == "250.0 ms" and row["answer / question"] == "40.0 ms"
  assert _table_row(md, "Costs", "in_context")["bytes/doc (kv_cache)"] == "2,000,000 (1.9 MiB)"
  assert "skipped" not in md


def test_no_facts_skips_the_interference_plot(tmp_path):
  md = _write(tmp_path, _records(facts=False))
  assert not (tmp_path / "interference.png").exists()
  assert "Interference: metrics vs facts per document: skipped — no record has facts" in md
  assert "## By facts per document\n\nNo records carry this field." in md


def test_meta_overrides_and_run_meta(tmp_path):
  _write(tmp_path, meta={"git_revision": "abc123"})
  assert _strict_json((tmp_path / "results.json").read_text())["meta"]["git_revision"] == "abc123"
  meta = report.run_meta()
  assert meta["git_revision"] == "unknown" or len(meta["git_revision"]) == 40
  assert set(meta["machine"]) == {"platform", "python", "cpu_count", "jax_devices"}


@pytest.mark.parametrize("kw, match", [
    ({"costs": {"bytes": {}}}, "unknown cost key"),
    ({"primary": "bleu"}, "unknown metric"),
    ({"bins": {"length": (0, 100)}}, "outside the bins"),
])
def test_bad_report_arguments_are_user_errors(tmp_path, kw, match):
  with pytest.raises(UserError, match=match):
    _write(tmp_path, **kw)


def test_no_records_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="no question records"):
    _write(tmp_path, [])


def test_load_records_of_a_non_report(tmp_path):
  (tmp_path / "results.json").write_text("{}")
  with pytest.raises(UserError, match="no 'records'"):
    report.load_records(tmp_path)


def test_report_files_are_readable_like_any_new_file(tmp_path):
  # Atomic writes go through mkstemp (mode 0600); a report must get the mode a plain open() would give it.
  _write(tmp_path)
  folder = tmp_path
  mask = os.umask(0o022)
  os.umask(mask)
  for name in ("results.json", "report.md"):
    assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~mask
