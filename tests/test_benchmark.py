"""The decoding benchmark: method specs, settings, NLL scoring, the docs section, and `masktok bench --quick`."""

import json

import peft
import pytest
import torch

from masktok_peft import MaskTokConfig, MaskTokError
from masktok_peft.benchmark import BenchmarkSettings, continuation_nll, parse_method, run_benchmark
from masktok_peft.benchmark_report import (
    DOCS_BEGIN,
    DOCS_END,
    docs_markers,
    docs_plot_file,
    render_table,
    update_docs,
)
from masktok_peft.cli import main
from masktok_peft.generation.policies import POLICIES
from masktok_peft.models import load_masktok_model

# GPT-2 has no free embedding row, so the mask row is added past the end and stock decoding can
# never emit the mask id: the gated adapter at one token per pass must then equal stock greedy.
KIND = "gpt2"
QUESTIONS = ["w1 w2 w3 w4", "w5 w6", "w7 w8 w9 w10 w11", "w12 w13 w14", "w15"]


@pytest.mark.parametrize(
    ("spec", "expected_spec", "label", "decoding", "kwargs"),
    [
        ("stock", "stock", "stock greedy", "stock", {}),
        ("lookup", "lookup:10", "prompt lookup 10", "stock", {"prompt_lookup_num_tokens": 10}),
        ("lookup:3", "lookup:3", "prompt lookup 3", "stock", {"prompt_lookup_num_tokens": 3}),
        (
            "confadapt:0.90",
            "confadapt:0.9",
            "ConfAdapt 0.9",
            "masktok",
            {"masktok_policy": "confadapt", "masktok_threshold": 0.9},
        ),
        ("confadapt", "confadapt", "ConfAdapt", "masktok", {"masktok_policy": "confadapt"}),
        ("static:3", "static:3", "static k=3", "masktok", {"masktok_policy": "static", "masktok_max_k": 3}),
        ("off", "off", "off", "masktok", {"masktok_policy": "off"}),
    ],
)
def test_parse_method_specs(spec, expected_spec, label, decoding, kwargs):
    method = parse_method(spec)
    assert method.spec == expected_spec
    assert method.label == label
    assert method.decoding == decoding
    assert method.generate_kwargs == kwargs
    assert parse_method(method.spec) == method


def test_parse_method_max_k():
    assert parse_method("confadapt:0.8", max_k=4).generate_kwargs["masktok_max_k"] == 4
    # static:K sets its own width, whatever max_k is.
    assert parse_method("static:2", max_k=4).generate_kwargs["masktok_max_k"] == 2
    assert parse_method("lookup:5", max_k=4).generate_kwargs == {"prompt_lookup_num_tokens": 5}


def test_parse_method_lookup_batch_limit():
    method = parse_method("lookup:10")
    assert method.max_batch_size == 1
    assert "batch size 1" in method.limit_reason
    assert parse_method("stock").max_batch_size is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("beam", "Unknown method"),
        ("stock:2", "takes no value"),
        ("lookup:0", "at least 1 token"),
        ("lookup:many", "not an integer"),
        ("confadapt:1.5", "must be in \\(0, 1\\]"),
        ("confadapt:high", "not a number"),
        ("static:0", "at least 1"),
        ("off:2", "takes no value"),
    ],
)
def test_parse_method_rejects(spec, message):
    with pytest.raises(MaskTokError, match=message):
        parse_method(spec)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"methods": ("confadapt:0.9",)}, "leave out 'stock'"),
        ({"methods": ("stock", "static:2", "static:2")}, "same method twice"),
        ({"methods": ("stock", "confadapt:0.9", "confadapt:0.90")}, "same method twice"),
        ({"batch_sizes": (1, 0)}, "positive integers"),
        ({"batch_sizes": ()}, "positive integers"),
        ({"batch_sizes": (8, 8)}, "duplicates"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"warmup_tokens": 0}, "warmup_tokens"),
    ],
)
def test_settings_reject(settings, message):
    with pytest.raises(MaskTokError, match=message):
        BenchmarkSettings(**settings)


def test_continuation_nll_known_answer(load_tiny):
    model, _ = load_tiny(KIND)
    prompt, continuation = [7, 8, 9], [10, 11, 12, 13]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([prompt + continuation])).logits[0], dim=-1)
    # The token at position i is predicted by the logits at position i - 1.
    expected = -sum(log_probs[len(prompt) + j - 1, token].item() for j, token in enumerate(continuation))
    assert continuation_nll(model, prompt, continuation) == pytest.approx(expected, rel=1e-5)
    assert continuation_nll(model, prompt, []) == 0.0


def test_update_docs_replaces_block(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Training\n\nOther section.\n")
    update_docs(docs, "### Run one\n")
    update_docs(docs, "### Run two\n")
    text = docs.read_text()
    assert text.count(DOCS_BEGIN) == 1
    assert text.count(DOCS_END) == 1
    assert "Run one" not in text
    assert "### Run two" in text
    assert text.startswith("# Benchmarks\n\n## Training\n\nOther section.\n")


def test_update_docs_named_sections_stay_apart(tmp_path):
    docs = tmp_path / "benchmarks.md"
    update_docs(docs, "### Default run\n")
    update_docs(docs, "### Ablation one\n", "gated-vs-ungated")
    update_docs(docs, "### Ablation two\n", "gated-vs-ungated")
    text = docs.read_text()
    begin, end = docs_markers("gated-vs-ungated")
    assert begin == "<!-- masktok bench gated-vs-ungated: begin -->"
    assert text.count(begin) == 1
    assert text.count(end) == 1
    assert "### Default run" in text
    assert "Ablation one" not in text
    assert text.index(DOCS_END) < text.index("### Ablation two") < text.index(end)
    assert docs_markers() == (DOCS_BEGIN, DOCS_END)
    assert docs_plot_file() == "decoding_speedup_vs_fidelity.png"
    assert docs_plot_file("gated-vs-ungated") == "decoding_gated-vs-ungated.png"


@pytest.mark.parametrize("name", ["", "Gated", "a b", "../up", "a--b", "-a"])
def test_docs_section_name_rejected(tmp_path, name):
    with pytest.raises(ValueError, match="lowercase letters, digits and hyphens"):
        update_docs(tmp_path / "benchmarks.md", "### Run\n", name)
    assert not (tmp_path / "benchmarks.md").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        (f"# Benchmarks\n{DOCS_BEGIN}\n", "contains them 1 and 0 times"),
        (f"{DOCS_BEGIN}\n{DOCS_END}\n{DOCS_BEGIN}\n{DOCS_END}\n", "contains them 2 and 2 times"),
        (f"{DOCS_END}\n### Run\n{DOCS_BEGIN}\n", "comes before"),
    ],
)
def test_update_docs_bad_markers(tmp_path, text, message):
    docs = tmp_path / "benchmarks.md"
    docs.write_text(text)
    with pytest.raises(ValueError, match=message):
        update_docs(docs, "### Run\n")
    assert docs.read_text() == text


@pytest.fixture
def adapters(load_tiny, tmp_path):
    """Folders of a gated and an ungated masktok adapter with random LoRA weights on the tiny GPT-2."""
    folders = {}
    for seed, gated in enumerate((True, False)):
        model, _ = load_tiny(KIND)
        torch.manual_seed(seed)
        peft_model = peft.get_peft_model(model, MaskTokConfig(r=4, init_lora_weights=False, gated=gated))
        folder = tmp_path / ("gated" if gated else "ungated")
        peft_model.save_pretrained(folder)
        folders["gated" if gated else "ungated"] = folder
    return folders


@pytest.fixture
def gsm8k_file(tmp_path):
    path = tmp_path / "test.jsonl"
    rows = [{"question": question, "answer": "w1 w2 w3\n#### 5"} for question in QUESTIONS]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_bench_rejects_same_labels(adapters, gsm8k_file, tmp_path, capsys):
    argv = ["bench", "--quick", "--data", str(gsm8k_file), "--adapter", str(adapters["gated"])]
    argv += ["--compare-adapter", str(adapters["gated"]), "--output-dir", str(tmp_path / "out"), "--no-plot"]
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    assert "Pass --label and --compare-label" in capsys.readouterr().err


def test_bench_bad_docs_section(gsm8k_file, tmp_path, capsys):
    argv = ["bench", "--quick", "--data", str(gsm8k_file), "--docs-section", "Gated vs ungated"]
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    assert "'Gated vs ungated' is not valid" in capsys.readouterr().err


@pytest.mark.parametrize("docs_text", [None, f"# Benchmarks\n{DOCS_BEGIN}\n"])
def test_bench_checks_docs_file_first(gsm8k_file, tmp_path, capsys, docs_text):
    # A folder, or a file with one marker, fails before any model is loaded (no --adapter is needed to get there).
    docs = tmp_path / "docs"
    docs.mkdir()
    if docs_text is not None:
        docs = docs / "benchmarks.md"
        docs.write_text(docs_text)
    argv = ["bench", "--quick", "--data", str(gsm8k_file), "--docs-file", str(docs), "--output-dir", str(tmp_path)]
    argv += ["--model", str(tmp_path / "no-such-model")]
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert str(docs) in error
    assert "no-such-model" not in error


def test_bench_missing_docs_folder(gsm8k_file, tmp_path, capsys):
    docs = tmp_path / "missing" / "benchmarks.md"
    argv = ["bench", "--quick", "--data", str(gsm8k_file), "--docs-file", str(docs), "--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_quick_report(adapters, gsm8k_file, tmp_path, capsys):
    output_dir = tmp_path / "report"
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    docs.write_text("# Benchmarks\n")
    methods = ["stock", "lookup:4", "confadapt:0.9", "static:2", "off"]
    argv = ["bench", "--quick", "--data", str(gsm8k_file), "--adapter", str(adapters["gated"])]
    argv += ["--compare-adapter", str(adapters["ungated"]), "--methods", *methods]
    argv += ["--output-dir", str(output_dir), "--docs-file", str(docs), "--threads", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out

    report = json.loads((output_dir / "results.json").read_text())
    metadata = report["metadata"]
    assert metadata["command"].startswith("masktok bench --data ")
    assert "--quick" in metadata["command"]
    assert metadata["questions"] == 4  # --quick reads only the first 4 of the 5 rows
    assert metadata["batch_sizes"] == [1, 2]
    assert metadata["max_new_tokens"] == 16
    assert metadata["data"] == str(gsm8k_file)
    assert metadata["machine"]["torch_threads"] == 1
    assert set(metadata["adapters"]) == {"gated", "ungated"}
    assert metadata["adapters"]["gated"]["gated"] is True
    assert metadata["adapters"]["ungated"]["gated"] is False
    assert metadata["adapters"]["ungated"]["path"] == str(adapters["ungated"])

    rows = {(row["adapter"], row["method"], row["batch_size"]): row for row in report["results"]}
    expected = {
        (adapter, method, batch_size)
        for batch_size in (1, 2)
        for method in methods
        for adapter in ((None,) if method in ("stock", "lookup:4") else ("gated", "ungated"))
    }
    assert set(rows) == expected
    assert "batch size 1 only" in rows[(None, "lookup:4", 2)]["skipped"]
    ran = [row for key, row in rows.items() if key != (None, "lookup:4", 2)]
    for row in ran:
        assert row["skipped"] is None
        assert row["prompts"] == 4
        assert row["new_tokens"] > 0
        assert row["seconds"] > 0
        assert row["speedup"] > 0
        assert 0.0 <= row["identical_share"] <= 1.0
        assert row["nll_per_token"] > 0

    for batch_size in (1, 2):
        stock = rows[(None, "stock", batch_size)]
        assert stock["speedup"] == pytest.approx(1.0)
        assert stock["identical_share"] == 1.0
        assert stock["tokens_per_pass"] == 1.0
        assert stock["nll_per_token"] == pytest.approx(stock["stock_nll_per_token"])
        # One token per pass with a gated adapter is the base model's own greedy decoding.
        assert rows[("gated", "off", batch_size)]["identical_share"] == 1.0
        assert rows[("gated", "off", batch_size)]["tokens_per_pass"] == 1.0
        # Random LoRA weights applied at every position change the base model's choices.
        assert rows[("ungated", "off", batch_size)]["identical_share"] < 1.0
        assert rows[("gated", "static:2", batch_size)]["tokens_per_pass"] > 1.0
        assert rows[("gated", "static:2", batch_size)]["accepted_histogram"]
    assert rows[(None, "lookup:4", 1)]["forward_passes"] <= rows[(None, "lookup:4", 1)]["new_tokens"]

    outputs = [json.loads(line) for line in (output_dir / "outputs.jsonl").read_text().splitlines()]
    assert len(outputs) == 4 * len(ran)
    assert {output["prompt_index"] for output in outputs} == {0, 1, 2, 3}
    assert all(output["reference"] == "5" for output in outputs)

    table = (output_dir / "results.md").read_text()
    assert "| adapter | method | batch | tokens/pass |" in table
    assert table.count("| ungated | static k=2 |") == 2
    assert "prompt lookup 4 at batch size 2: not run" in table
    assert "![Speed-up against fidelity](speedup_vs_fidelity.png)" in table
    assert "| gated | ConfAdapt 0.9 | 1 |" in printed
    assert (output_dir / "speedup_vs_fidelity.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    docs_text = docs.read_text()
    assert docs_text.startswith("# Benchmarks\n")
    assert docs_text.count(DOCS_BEGIN) == 1
    assert "| gated | static k=2 | 2 |" in docs_text
    assert (docs.parent / "decoding_speedup_vs_fidelity.png").is_file()
    assert "![Speed-up against fidelity](decoding_speedup_vs_fidelity.png)" in docs_text


def test_rejected_method_is_skipped(adapters, gsm8k_file):
    # Decoding rejects the verify policy with an ungated adapter; the run reports it instead of failing.
    if "verify" not in POLICIES:
        pytest.skip("this version has no verify policy")
    model, tokenizer = load_masktok_model(str(adapters["ungated"]))
    rows = [json.loads(line) for line in gsm8k_file.read_text().splitlines()[:2]]
    settings = BenchmarkSettings(methods=("stock", "verify"), batch_sizes=(1,), max_new_tokens=4)
    result = run_benchmark({"ungated": model}, tokenizer, rows, settings, progress=False)
    verify = [row for row in result.rows if row["method"] == "verify"]
    assert len(verify) == 1
    assert verify[0]["skipped"].startswith("not run: ")
    assert "gated" in verify[0]["skipped"]
    assert "verify with adapter ungated at batch size 1: not run" in render_table(result)
    assert not [output for output in result.outputs if output["method"] == "verify"]
