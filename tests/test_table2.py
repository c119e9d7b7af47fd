"""benchmarks/table2_movielens.py: the run variants, resuming, the summary over seeds and the gap column."""
import importlib.util
import os
import statistics

import pytest

REPO = os.path.join(os.path.dirname(__file__), "..")
_SPEC = importlib.util.spec_from_file_location("table2_movielens", os.path.join(REPO, "benchmarks",
                                                                              "table2_movielens.py"))
table2 = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(table2)
METRICS = table2.METRICS


def _record(dataset_id, row, seed, values, train_seconds=10.0):
    """A stored run record whose four test metrics are `values` (in METRICS order)."""
    return {"dataset_id": dataset_id, "row": row, "expid": f"{row}_x", "seed": seed, "epochs_run": 3,
            "test": dict(zip(METRICS, values)), "seconds": {"train": train_seconds},
            "eval_users": {"test": 94}}


def test_variant_entry_sets_the_seed_and_redraws_the_split_only_where_asked():
    entry = {"model": "DSSM", "dataset_id": "ml100k_recbole", "seed": 2023, "model_id": "X",
             "_config_file": "a.yaml", "temperature": 0.1}
    same_split = table2.variant_entry(entry, "ml100k_recbole", table2.DEFAULT_SPLIT_SEED)
    assert same_split["seed"] == table2.DEFAULT_SPLIT_SEED and "split_seed" not in same_split
    assert "_config_file" not in same_split and "model_id" not in same_split and same_split["temperature"] == 0.1
    other = table2.variant_entry(entry, "ml100k_recbole", 2024)
    assert other["seed"] == other["split_seed"] == 2024 and "split_2024" in other["data_root"]
    pairs = table2.variant_entry(dict(entry, dataset_id="ml1m_pairs"), "ml1m_pairs", 2024)
    assert pairs["seed"] == 2024 and "split_seed" not in pairs and "data_root" not in pairs
    assert entry["seed"] == 2023                                           # the expid's entry is not changed


def test_a_finished_run_is_reused_only_with_the_same_entry(tmp_path):
    entry = table2.variant_entry({"model": "EASE", "dataset_id": "ml1m_pairs", "regularization": 1000.0},
                                 "ml1m_pairs", 2024)
    path = table2.run_path(str(tmp_path), "ml1m_pairs", "EASE_x", 2024)
    assert table2.finished_record(path, entry) is None                    # nothing yet
    record = dict(_record("ml1m_pairs", "EASE", 2024, (0.1, 0.2, 0.3, 0.2)), entry=table2._canonical(entry))
    table2.write_json_atomic(path, record)
    assert table2.finished_record(path, entry)["test"] == record["test"]
    assert table2.finished_record(path, dict(entry, regularization=500.0)) is None   # the expid changed
    with open(path, "w") as fd:
        fd.write("{not json")
    assert table2.finished_record(path, entry) is None


def test_summary_is_the_mean_and_sample_std_over_seeds_and_the_gap_is_per_seed():
    dssm = [(0.05, 0.20, 0.30, 0.18), (0.06, 0.22, 0.32, 0.20), (0.04, 0.18, 0.28, 0.16)]
    sparcode = [(0.05, 0.21, 0.29, 0.19), (0.07, 0.23, 0.33, 0.21), (0.05, 0.19, 0.26, 0.17)]
    records = [_record("ml1m_pairs", "DSSM", 2023 + i, v, 10.0 * (i + 1)) for i, v in enumerate(dssm)]
    records += [_record("ml1m_pairs", "SparCode-DNN", 2023 + i, v) for i, v in enumerate(sparcode)]
    table = table2.summarise(records)
    line = table[("ml1m_pairs", "DSSM")]
    for k, metric in enumerate(METRICS):
        values = [v[k] for v in dssm]
        assert line[metric][0] == pytest.approx(statistics.mean(values))
        assert line[metric][1] == pytest.approx(statistics.stdev(values))
    assert line["train_seconds"][0] == pytest.approx(20.0) and line["seeds"] == [2023, 2024, 2025]
    gaps = table2.gap_to(table[("ml1m_pairs", "SparCode-DNN")], line)
    differences = [s[2] - d[2] for s, d in zip(sparcode, dssm)]               # Recall@50 per seed
    assert gaps["Recall(k=50)"][0] == pytest.approx(statistics.mean(differences))
    assert gaps["Recall(k=50)"][1] == pytest.approx(statistics.stdev(differences))
    note = table2.gap_note(table[("ml1m_pairs", "SparCode-DNN")], line, "DSSM")
    assert note.startswith("**loses to DSSM**") and "R@50 -0.0067" in note   # loses on Recall@50 only
    assert "R@20" not in note and "NDCG@50" not in note
    assert table2.gap_note(line, line, "DSSM") == ">= DSSM on all four"
    only_2023 = table2.summarise(records[3:4])[("ml1m_pairs", "SparCode-DNN")]
    assert table2.gap_to(only_2023, line)["Recall(k=50)"] == (pytest.approx(0.29 - 0.30), None)


def test_table_keeps_the_notes_and_names_the_missing_expids(tmp_path):
    records = [_record("ml1m_pairs", "DSSM", 2023, (0.05, 0.2, 0.3, 0.18))]
    runs = [("ml1m_pairs", "SparCode-GRU", "SparCode_ml1m_pairs_gru", 2023, None, "not defined yet")]
    out = str(tmp_path / "t2")
    with open(out + ".md", "w") as fd:
        fd.write(f"# Title\n\nintro\n\n{table2.TABLE_START}\nold\n{table2.TABLE_END}\n\nnotes kept\n")
    table2.write_outputs(out, table2.summarise(records), runs, ["ml1m_pairs"], ["DSSM", "SparCode-GRU"], [2023])
    with open(out + ".md") as fd:
        text = fd.read()
    assert text.startswith("# Title\n\nintro\n") and text.endswith("notes kept\n") and "\nold\n" not in text
    assert "| SparCode-GRU | SparCode_ml1m_pairs_gru | 0 | | not defined yet |" in text
    assert "| DSSM | DSSM_x | 2023 | 94 | 0.0500 | 0.2000 | 0.3000 | 0.1800 |" in text
    with open(out + ".csv") as fd:
        rows = fd.read().splitlines()
    assert len(rows) == 2 and rows[1].startswith("ml1m_pairs,DSSM,DSSM_x,2023,94,0.05,")


def test_the_baseline_rows_have_expids_in_the_repository_config():
    known = set(table2.list_expids(os.path.join(REPO, "config")))
    for row in ("Popularity", "EASE", "ItemKNN", "DSSM", "GRU4Rec", "SASRec"):
        for dataset_id, expid in table2.ROWS[row][1].items():
            assert expid in known, (row, dataset_id, expid)
            assert table2.load_model_config(os.path.join(REPO, "config"), expid)["dataset_id"] == dataset_id
