"""Reports of a decoding benchmark run: figures, JSON, a Markdown table, and a plot of speed-up against fidelity.

`masktok_peft.benchmark` measures. This module describes the run (machine, adapters), turns the
measurements into figures, and writes them. The plot needs matplotlib (`pip install matplotlib`),
which is imported only when a plot is drawn.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .data import gsm8k_final_answer
from .evaluation import normalize_number, predicted_answer

if TYPE_CHECKING:
    from .benchmark import BenchmarkResult, Measurement

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
OUTPUTS_FILE = "outputs.jsonl"
TABLE_FILE = "results.md"
PLOT_FILE = "speedup_vs_fidelity.png"
DEFAULT_DOCS_SECTION = "results"
DOCS_SECTION_PATTERN = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
DOCS_BEGIN = "<!-- masktok bench results: begin -->"
DOCS_END = "<!-- masktok bench results: end -->"

TABLE_NOTES = """\
- tokens/pass: new tokens per forward pass that a row takes part in.
- tokens/s: new tokens (up to and including EOS) per second spent in `generate`, all rows of a batch together.
- speed-up: tokens/s over stock greedy's tokens/s at the same batch size, measured in the same run. In
  brackets: the interquartile range of the per-batch ratios, which shows how much machine noise moves it.
- identical: share of answers whose new tokens equal stock greedy's answer at the same batch size.
- accuracy: share of answers whose final number matches the GSM8K reference.
- NLL/token: mean negative log-likelihood (nats per token) of the answers' tokens under the base model
  with the adapter disabled. stock NLL/token: the same for stock greedy's answers to the same questions."""


def machine_description(device: torch.device) -> dict[str, Any]:
    """Describe where the benchmark runs: OS, CPU, torch threads, accelerator and library versions."""
    import peft
    import transformers

    from . import __version__

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass  # not Linux: keep what the platform module reports
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "accelerator": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "masktok_peft": __version__,
    }


def adapter_description(model) -> dict[str, Any]:
    """Return the settings of a PEFT model's active masktok adapter that bear on speed and fidelity."""
    config = model.peft_config[model.active_adapter]
    return {
        "gated": config.gated,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": sorted(config.target_modules) if config.target_modules else None,
        "mask_token_id": config.mask_token_id,
        "max_k": config.max_k,
        "threshold": config.threshold,
        "base_model_name_or_path": config.base_model_name_or_path,
    }


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0]] * 3 if values else []
    return statistics.quantiles(values, n=4, method="inclusive")


def summarize(
    measurements: list[Measurement],
    rows: list[dict[str, str]],
    tokenizer,
    scores: dict,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Build one summary row per measurement and one record per output, from the measurements and NLL scores."""
    from .benchmark import STOCK  # imported here because benchmark imports this module

    references = [normalize_number(gsm8k_final_answer(row["answer"])) for row in rows]
    stock = {m.batch_size: m for m in measurements if m.method.spec == STOCK}
    summaries, outputs = [], []
    for measurement in measurements:
        summary = {
            "adapter": measurement.adapter,
            "method": measurement.method.spec,
            "label": measurement.method.label,
            "batch_size": measurement.batch_size,
            "generate_kwargs": measurement.method.generate_kwargs,
            "skipped": measurement.skipped,
        }
        summaries.append(summary)
        if measurement.skipped:
            continue
        reference = stock[measurement.batch_size]
        correct = identical = 0
        nll_total = 0.0
        for index, ids in sorted(measurement.new_ids.items()):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            predicted = predicted_answer(text)
            nll = scores[(index, tuple(ids))]
            record = {
                "adapter": measurement.adapter,
                "method": measurement.method.spec,
                "batch_size": measurement.batch_size,
                "prompt_index": index,
                "new_tokens": len(ids),
                "forward_passes": measurement.row_passes[index],
                "identical_to_stock": ids == reference.new_ids[index],
                "predicted": predicted,
                "reference": references[index],
                "correct": predicted is not None and predicted == references[index],
                "nll_per_token": nll / len(ids) if ids else None,
                "text": text,
            }
            outputs.append(record)
            correct += record["correct"]
            identical += record["identical_to_stock"]
            nll_total += nll

        new_tokens = sum(len(ids) for ids in measurement.new_ids.values())
        row_passes = sum(measurement.row_passes.values())
        seconds = sum(measurement.batch_seconds)
        stock_tokens = sum(len(ids) for ids in reference.new_ids.values())
        stock_nll = sum(scores[(index, tuple(ids))] for index, ids in reference.new_ids.items())
        tokens_per_second = new_tokens / seconds if seconds else 0.0
        stock_rate = stock_tokens / sum(reference.batch_seconds) if sum(reference.batch_seconds) else 0.0
        # Per-batch ratios show how much the aggregate speed-up moves with machine noise.
        batch_ratios = [
            (tokens / seconds) / (ref_tokens / ref_seconds)
            for tokens, seconds, ref_tokens, ref_seconds in zip(
                measurement.batch_tokens,
                measurement.batch_seconds,
                reference.batch_tokens,
                reference.batch_seconds,
                strict=True,
            )
            if seconds and ref_seconds and ref_tokens
        ]
        prompts = len(measurement.new_ids)
        summary.update(
            {
                "prompts": prompts,
                "new_tokens": new_tokens,
                "forward_passes": measurement.forward_passes,
                "row_passes": row_passes,
                "tokens_per_pass": new_tokens / row_passes if row_passes else 0.0,
                "seconds": seconds,
                "tokens_per_second": tokens_per_second,
                "speedup": tokens_per_second / stock_rate if stock_rate else None,
                "speedup_batch_quartiles": _quartiles(batch_ratios),
                "identical_share": identical / prompts,
                "accuracy": correct / prompts,
                "nll_per_token": nll_total / new_tokens if new_tokens else None,
                "stock_nll_per_token": stock_nll / stock_tokens if stock_tokens else None,
                "accepted_histogram": dict(sorted(measurement.histogram.items())),
            }
        )
    return summaries, outputs


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _speedup(row: dict[str, Any]) -> str:
    if row["speedup"] is None:
        return "-"
    text = f"{row['speedup']:.2f}x"
    quartiles = row["speedup_batch_quartiles"]
    if len(quartiles) == 3 and quartiles[0] != quartiles[2]:
        text += f" ({quartiles[0]:.2f}-{quartiles[2]:.2f})"
    return text


def render_table(result: BenchmarkResult) -> str:
    """Render the summary rows as a Markdown table, and list the methods that did not run under it."""
    lines = [
        "| adapter | method | batch | tokens/pass | tokens/s | speed-up | identical | accuracy | NLL/token "
        "| stock NLL/token |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    skipped = []
    for row in result.rows:
        if row["skipped"]:
            adapter = f" with adapter {row['adapter']}" if row["adapter"] else ""
            skipped.append(
                f"- {row['label']}{adapter} at batch size {row['batch_size']}: {row['skipped'].rstrip('.')}."
            )
            continue
        cells = [
            row["adapter"] or "-",
            row["label"],
            str(row["batch_size"]),
            _number(row["tokens_per_pass"], 2),
            _number(row["tokens_per_second"], 1),
            _speedup(row),
            _percent(row["identical_share"]),
            _percent(row["accuracy"]),
            _number(row["nll_per_token"], 3),
            _number(row["stock_nll_per_token"], 3),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + skipped if skipped else []))


def _describe_adapter(label: str, adapter: dict[str, Any]) -> str:
    kind = "gated" if adapter["gated"] else "ungated"
    modules = ", ".join(adapter["target_modules"] or [])
    source = adapter.get("path") or adapter["base_model_name_or_path"]
    return (
        f"`{label}`: `{source}` ({kind}, LoRA r={adapter['r']} on {modules}, max_k {adapter['max_k']}, "
        f"mask token id {adapter['mask_token_id']})"
    )


def render_markdown(result: BenchmarkResult, plot_path: str | None = None) -> str:
    """Render the run as a Markdown section: what was measured and where, the table, notes, the plot."""
    meta = result.metadata
    machine = meta["machine"]
    device = machine["accelerator"] or machine["device"]
    data = meta.get("data", "GSM8K")
    adapters = "; ".join(_describe_adapter(label, adapter) for label, adapter in meta["adapters"].items())
    lines = [
        f"### GSM8K decoding benchmark: {Path(meta['model']).name}",
        "",
        f"Measured on {meta['started_utc']} in {meta['seconds'] / 60:.1f} minutes with:",
        "",
        "```bash",
        meta.get("command", "masktok bench"),
        "```",
        "",
        f"- Model: `{meta['model']}` ({meta['dtype']}).",
        f"- Adapters: {adapters}.",
        f"- Data: `{data}`, the first {meta['questions']} questions, greedy decoding, at most "
        f"{meta['max_new_tokens']} new tokens per answer.",
        f"- Machine: {machine['platform']}, {machine['cpu']} ({machine['cpu_count']} CPUs), "
        f"torch threads: {machine['torch_threads']}, device: {device}; torch {machine['torch']}, "
        f"transformers {machine['transformers']}, peft {machine['peft']}, masktok-peft {machine['masktok_peft']}.",
        "",
        render_table(result),
        "",
        TABLE_NOTES,
    ]
    if plot_path is not None:
        lines += ["", f"![Speed-up against fidelity]({plot_path})"]
    return "\n".join(lines) + "\n"


def plot_speedup_fidelity(result: BenchmarkResult, path: str | os.PathLike) -> Path:
    """Plot speed-up against accuracy and against identical-output share, one point per method and batch size."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows = [row for row in result.rows if not row["skipped"]]
    adapters = [None] + list(result.metadata["adapters"])
    colors = {label: f"C{index}" for index, label in enumerate(adapters)}
    colors[None] = "black"
    markers = dict(zip(result.metadata["batch_sizes"], "os^Dvp*hX", strict=False))

    figure = Figure(figsize=(11, 4.8), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    panels = (("accuracy", "GSM8K accuracy (%)"), ("identical_share", "answers identical to stock greedy (%)"))
    for axis, (key, title) in zip(axes, panels, strict=True):
        for row in rows:
            x, y = 100 * row[key], row["speedup"]
            axis.scatter(x, y, color=colors[row["adapter"]], marker=markers.get(row["batch_size"], "o"), s=36)
            axis.annotate(row["label"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
        # Without a margin, points that all share one x value get an axis a few hundredths wide.
        values = [100 * row[key] for row in rows]
        margin = max(3.0, 0.05 * (max(values) - min(values)))
        axis.set_xlim(max(min(values) - margin, -1.0), min(max(values) + margin, 101.0))
        axis.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        axis.set_xlabel(title)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("speed-up over stock greedy (tokens/s ratio)")

    handles = [
        Line2D([], [], color=colors[label], marker="o", linestyle="", label=label or "stock") for label in adapters
    ]
    handles += [
        Line2D([], [], color="gray", marker=marker, linestyle="", label=f"batch {size}")
        for size, marker in markers.items()
    ]
    axes[1].legend(handles=handles, fontsize=7, loc="best")
    meta, machine = result.metadata, result.metadata["machine"]
    figure.suptitle(
        f"{Path(meta['model']).name}, {meta['questions']} GSM8K questions, "
        f"torch threads: {machine['torch_threads']}, {machine['accelerator'] or machine['cpu']}",
        fontsize=9,
    )
    path = Path(path)
    figure.savefig(path, dpi=150)
    return path


def validate_docs_section(name: str) -> str:
    """Return `name` if it can name a docs section (lowercase letters, digits and single hyphens), else raise."""
    if not isinstance(name, str) or not DOCS_SECTION_PATTERN.fullmatch(name):
        raise ValueError(
            f"Docs section name {name!r} is not valid. Use lowercase letters, digits and hyphens, such as "
            "'gated-vs-ungated'."
        )
    return name


def docs_markers(name: str = DEFAULT_DOCS_SECTION) -> tuple[str, str]:
    """Return the begin and end markers that enclose the docs section `name` in a Markdown file."""
    validate_docs_section(name)
    return f"<!-- masktok bench {name}: begin -->", f"<!-- masktok bench {name}: end -->"


def docs_plot_file(name: str = DEFAULT_DOCS_SECTION) -> str:
    """Return the file name of the plot copied next to the docs for section `name`."""
    validate_docs_section(name)
    return "decoding_speedup_vs_fidelity.png" if name == DEFAULT_DOCS_SECTION else f"decoding_{name}.png"


def _find_section(text: str, path: Path, name: str) -> tuple[int, int] | None:
    """Return the offsets of section `name`'s begin marker and of the end of its end marker, or None if absent."""
    begin_marker, end_marker = docs_markers(name)
    begins, ends = text.count(begin_marker), text.count(end_marker)
    if begins == 0 and ends == 0:
        return None
    if begins != 1 or ends != 1:
        raise ValueError(
            f"{path} must contain the markers {begin_marker!r} and {end_marker!r} once each, but contains them "
            f"{begins} and {ends} times. Remove the extra markers or add the missing one."
        )
    begin, end = text.index(begin_marker), text.index(end_marker)
    if end < begin:
        raise ValueError(f"In {path}, the marker {end_marker!r} comes before {begin_marker!r}. Swap them.")
    return begin, end + len(end_marker)


def _read_docs_file(path: Path) -> str:
    """Return the text of a docs file, or "" if it does not exist yet. Raises if it cannot be a docs file."""
    if path.is_dir():
        raise ValueError(f"The docs file {path} is a folder. Pass a Markdown file, such as {path / 'benchmarks.md'}.")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"The folder of the docs file {path} does not exist. Create it, or pass another file.")
    return path.read_text(encoding="utf-8") if path.exists() else ""


def check_docs_file(docs_file: str | os.PathLike, name: str = DEFAULT_DOCS_SECTION) -> None:
    """Check that `update_docs` can write section `name` into this file, so that a long run fails before it starts."""
    path = Path(docs_file)
    _find_section(_read_docs_file(path), path, name)


def update_docs(docs_file: str | os.PathLike, section: str, name: str = DEFAULT_DOCS_SECTION) -> Path:
    """Put `section` between the markers of docs section `name` in a Markdown file, replacing what they enclosed.

    Other sections are left alone. A file without the markers gets them, with the section, appended
    at its end. A missing file is created.
    """
    begin_marker, end_marker = docs_markers(name)
    path = Path(docs_file)
    text = _read_docs_file(path)
    block = f"{begin_marker}\n{section.rstrip()}\n{end_marker}"
    found = _find_section(text, path, name)
    if found is not None:
        text = text[: found[0]] + block + text[found[1] :]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def write_report(
    result: BenchmarkResult,
    output_dir: str | os.PathLike,
    plot: bool = True,
    docs_file: str | os.PathLike | None = None,
    docs_section: str = DEFAULT_DOCS_SECTION,
) -> dict[str, Path]:
    """Write results.json, outputs.jsonl, results.md and (with `plot`) the plot. Returns the paths by kind.

    With `docs_file`, the Markdown section also goes between the markers of docs section
    `docs_section` in that file, and the plot is copied next to it (see `docs_plot_file`), so the
    docs do not link into the output folder.
    """
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / RESULTS_FILE, "outputs": folder / OUTPUTS_FILE, "markdown": folder / TABLE_FILE}
    paths["json"].write_text(
        json.dumps({"metadata": result.metadata, "results": result.rows}, indent=2) + "\n", encoding="utf-8"
    )
    with paths["outputs"].open("w", encoding="utf-8") as outputs:
        for record in result.outputs:
            outputs.write(json.dumps(record) + "\n")
    if plot:
        paths["plot"] = plot_speedup_fidelity(result, folder / PLOT_FILE)
    paths["markdown"].write_text(render_markdown(result, PLOT_FILE if plot else None), encoding="utf-8")

    if docs_file is not None:
        plot_name = docs_plot_file(docs_section)
        # Text first, so that a file that cannot be updated keeps the plot that matches its table.
        paths["docs"] = update_docs(docs_file, render_markdown(result, plot_name if plot else None), docs_section)
        if plot:
            paths["docs_plot"] = Path(docs_file).parent / plot_name
            shutil.copyfile(paths["plot"], paths["docs_plot"])
    logger.info("Wrote the benchmark report to %s.", folder)
    return paths
