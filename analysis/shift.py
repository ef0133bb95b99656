"""Representational shift: CKA, feature and prototype drift, BatchNorm statistic drift.

Pure tensor-in, number-out functions, plus :func:`analyse_run`, which reads the probe features a
run saved after every experience (``probes/exp<i>.safetensors``, see :mod:`cl.engine.probes`) and
turns them into tables and plots (``cl shift RUN_DIR``).

CKA (Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019,
https://arxiv.org/abs/1905.00414) compares two representations of the same n examples through
their Gram matrices K, L:

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

The biased HSIC uses ``tr(K H L H)`` with the centring matrix H. With few examples it is biased
upwards for unrelated representations; the debiased variant plugs in the unbiased HSIC estimator
of Song et al. (JMLR 2012), which needs n > 3.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def _f64(x: Tensor) -> Tensor:
    x = torch.as_tensor(x)
    return x.reshape(len(x), -1).to(torch.float64)


def gram_linear(x: Tensor) -> Tensor:
    x = _f64(x)
    return x @ x.T


def gram_rbf(x: Tensor, threshold: float = 1.0) -> Tensor:
    """RBF kernel with bandwidth ``threshold`` x the median pairwise distance (Kornblith et al.)."""
    x = _f64(x)
    sq = torch.cdist(x, x).pow(2)
    median = torch.median(sq[~torch.eye(len(x), dtype=torch.bool)]).sqrt()
    sigma2 = (threshold * median) ** 2
    return torch.exp(-sq / (2 * sigma2.clamp_min(1e-12)))


def center_gram(gram: Tensor, unbiased: bool = False) -> Tensor:
    """H K H, or the U-statistic centring whose Frobenius product gives the unbiased HSIC."""
    k = gram.to(torch.float64).clone()
    n = len(k)
    if not unbiased:
        means = k.mean(0)
        return k - means[None, :] - means[:, None] + means.mean()
    if n < 4:
        raise ValueError(f"the debiased estimator needs at least 4 examples, got {n}")
    k.fill_diagonal_(0)
    means = k.sum(0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    k = k - means[None, :] - means[:, None]
    k.fill_diagonal_(0)
    return k


def hsic_unbiased(k: Tensor, l: Tensor) -> float:
    """Song et al. (2012), eq. 5: the unbiased HSIC estimator, written out term by term."""
    k, l = k.to(torch.float64).clone(), l.to(torch.float64).clone()
    n = len(k)
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 examples, got {n}")
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    ones = torch.ones(n, dtype=torch.float64)
    term1 = torch.trace(k @ l)
    term2 = (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (ones @ k @ l @ ones)
    return float((term1 + term2 - term3) / (n * (n - 3)))


def cka(gram_x: Tensor, gram_y: Tensor, debiased: bool = False) -> float:
    """CKA of two Gram matrices over the same examples."""
    kx, ky = center_gram(gram_x, debiased), center_gram(gram_y, debiased)
    xy = torch.sum(kx * ky)
    denom = torch.linalg.norm(kx) * torch.linalg.norm(ky)
    return float(xy / denom) if float(denom) > 0 else float("nan")


def linear_cka(x: Tensor, y: Tensor, debiased: bool = False) -> float:
    """Linear CKA of features ``x`` [n, p] and ``y`` [n, q] of the same n examples.

    The biased form is computed in feature space, ``||Y'X||^2 / (||X'X|| ||Y'Y||)`` on centred
    columns, which is cheaper than n x n Gram matrices when n is larger than the feature sizes.
    """
    x, y = _f64(x), _f64(y)
    if len(x) != len(y):
        raise ValueError(f"CKA needs the same examples in both: {len(x)} vs {len(y)}")
    if debiased:
        return cka(gram_linear(x), gram_linear(y), debiased=True)
    x = x - x.mean(0)
    y = y - y.mean(0)
    xy = torch.linalg.norm(y.T @ x) ** 2
    denom = torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y)
    return float(xy / denom) if float(denom) > 0 else float("nan")


def rbf_cka(x: Tensor, y: Tensor, threshold: float = 1.0, debiased: bool = False) -> float:
    return cka(gram_rbf(x, threshold), gram_rbf(y, threshold), debiased)


def feature_drift(before: Tensor, after: Tensor) -> dict[str, float]:
    """How far each probe example's features moved between two checkpoints.

    Returns:
        l2: mean Euclidean distance; rel_l2: that over the mean norm before; cosine: mean (1 - cos).
    """
    a, b = _f64(before), _f64(after)
    dist = torch.linalg.norm(b - a, dim=1)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    norm = torch.linalg.norm(a, dim=1).mean()
    return {
        "l2": float(dist.mean()),
        "rel_l2": float(dist.mean() / norm) if float(norm) > 0 else float("nan"),
        "cosine": float((1 - cos).mean()),
    }


def prototype_drift(before: Tensor, after: Tensor, labels: Tensor) -> dict[str, float]:
    """Movement of class means (prototypes) of the probe features between two checkpoints."""
    a, b = _f64(before), _f64(after)
    moves, norms = [], []
    for c in torch.unique(labels):
        m = labels == c
        mu_a, mu_b = a[m].mean(0), b[m].mean(0)
        moves.append(torch.linalg.norm(mu_b - mu_a))
        norms.append(torch.linalg.norm(mu_a))
    move, norm = torch.stack(moves).mean(), torch.stack(norms).mean()
    return {"l2": float(move), "rel_l2": float(move / norm) if float(norm) > 0 else float("nan")}


def bn_mean_error(running: Tensor, batch: Tensor, std: Tensor | None = None) -> dict[str, float]:
    """Error of a BatchNorm layer's stored running mean against the true mean of the data.

    Returns:
        mae: mean absolute error per channel; rel_l2: ||running - batch|| / ||batch|| (unstable
        when the true means are near zero); z: mean over channels of |running - batch| / std, the
        offset the error puts on the layer's normalised output, in standard deviations (if ``std``).
    """
    r, t = running.to(torch.float64), batch.to(torch.float64)
    diff = r - t
    norm = torch.linalg.norm(t)
    out = {"mae": float(diff.abs().mean()), "rel_l2": float(torch.linalg.norm(diff) / norm) if float(norm) > 0 else float("nan")}
    if std is not None:
        out["z"] = float((diff.abs() / std.to(torch.float64)).mean())
    return out


# --------------------------------------------------------------------------------------------
# Run-level analysis of saved probes
# --------------------------------------------------------------------------------------------


def load_probes(run_dir: Any) -> tuple[dict[int, dict[str, Tensor]], dict[str, list[str]]]:
    """(experience -> {key: tensor}, layer names in network order) as written by :mod:`cl.engine.probes`."""
    import json
    import re
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    from cl.errors import DataError

    probes: dict[int, dict[str, Tensor]] = {}
    order: dict[str, list[str]] = {"feat": [], "bn": []}
    files = sorted(Path(run_dir, "probes").glob("exp*.safetensors"))
    for path in files:
        try:
            match = re.fullmatch(r"exp(\d+)", path.stem)
            if match is None:
                raise ValueError("not named exp<k>.safetensors")
            index = int(match.group(1))
            probes[index] = load_file(str(path))
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
            names = {kind: json.loads(meta.get(kind, "[]")) for kind in order}
            if not all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in names.values()):
                raise ValueError("layer names are not a list of strings")
            _check_probe_file(probes[index], index)
        except Exception as err:  # noqa: BLE001 - a damaged probe file is one line, not a traceback
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
            raise DataError(f"{path}: unreadable probe file ({first}); re-run the experiment to record it again") from None
        for kind in order:
            for name in names[kind]:
                if name not in order[kind]:
                    order[kind].append(name)
    if probes and sorted(probes) != list(range(len(probes))):
        raise DataError(f"{Path(run_dir, 'probes')}: probe files exp{sorted(probes)} are not exp0..exp{len(probes) - 1}")
    for i in sorted(probes)[1:]:  # every file probes the same examples of each task
        for key, labels in probes[i].items():
            if key.endswith("/labels/y") and int(key.split("/")[0][4:]) < i and not torch.equal(labels, probes[i - 1][key]):
                raise DataError(f"{Path(run_dir, 'probes')}: exp{i} probes other examples of {key.split('/')[0]} than exp{i - 1} (files mixed from other runs?)")
    return probes, order


def _check_probe_file(tensors: dict[str, Tensor], index: int) -> None:
    """Probes saved after experience ``index`` hold tasks 0..index, each with labels and features of matching length."""
    tasks = {_split_key(k)[0] for k in tensors}
    if tasks != set(range(index + 1)):
        raise ValueError(f"holds tasks {sorted(tasks)}, expected 0..{index}")
    for task in tasks:
        labels = tensors.get(f"task{task}/labels/y")
        if labels is None or labels.ndim != 1:
            raise ValueError(f"task {task} has no labels")
        for key, t in tensors.items():
            if key.startswith(f"task{task}/feat/") and (t.ndim != 2 or len(t) != len(labels)):
                raise ValueError(f"{key} has shape {tuple(t.shape)} for {len(labels)} labels")


def _split_key(key: str) -> tuple[int, str, str]:
    """'task3/feat/layer2' -> (3, 'feat', 'layer2')."""
    task, kind, name = key.split("/", 2)
    return int(task[4:]), kind, name


def shift_tables(probes: dict[int, dict[str, Tensor]], debiased: bool = False, kernel: str = "linear") -> dict[str, list[dict[str, Any]]]:
    """Compare every task's probe features after the experience that learned it with each later one.

    Returns:
        {"cka": rows(layer, task, experience, cka), "drift": rows(layer, task, experience, l2, rel_l2,
        cosine, proto_l2, proto_rel_l2), "bn": rows(layer, task, experience, mae, rel_l2)}.
    """
    rows: dict[str, list[dict[str, Any]]] = {"cka": [], "drift": [], "bn": []}
    experiences = sorted(probes)
    for k in experiences:
        parsed = [(_split_key(key), t) for key, t in probes[k].items()]
        for (task, kind, name), tensor in parsed:
            if task > k:
                continue
            if kind == "feat" and task in probes:
                ref = probes[task].get(f"task{task}/feat/{name}")
                labels = probes[k].get(f"task{task}/labels/y")
                if ref is None:
                    continue
                if kernel == "rbf":
                    value = rbf_cka(ref, tensor, debiased=debiased)
                else:
                    value = linear_cka(ref, tensor, debiased=debiased)
                rows["cka"].append({"layer": name, "task": task, "experience": k, "cka": value})
                drift = feature_drift(ref, tensor)
                proto = prototype_drift(ref, tensor, labels) if labels is not None else {"l2": math.nan, "rel_l2": math.nan}
                rows["drift"].append({"layer": name, "task": task, "experience": k, **drift, "proto_l2": proto["l2"], "proto_rel_l2": proto["rel_l2"]})
            elif kind == "bn_batch":
                # "bn_running" is the mean the network used; "bn_running_<variant>" what an alternative would use
                for variant in ("", *(key.split("/")[1][len("bn_running_"):] for key in probes[k] if key.startswith(f"task{task}/bn_running_") and key.endswith(f"/{name}"))):
                    running = probes[k].get(f"task{task}/bn_running{'_' + variant if variant else ''}/{name}")
                    std = probes[k].get(f"task{task}/bn_std/{name}")
                    if running is not None:
                        rows["bn"].append({"layer": name, "task": task, "experience": k, "variant": variant or "used", **bn_mean_error(running, tensor, std)})
    return rows


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def summarize_shift(tables: dict[str, list[dict[str, Any]]], order: dict[str, list[str]]) -> dict[str, Any]:
    """Per layer, at the last probed experience: mean over old tasks of CKA, drift and BN error.

    Also the CKA of every layer over experiences, averaged over the tasks already learned
    (``cka_curve[layer][k]``), which is what the comparison report plots.
    """
    last = max((r["experience"] for r in tables["cka"] + tables["bn"]), default=0)

    def old(rows: list[dict[str, Any]], layer: str, key: str) -> float | None:
        return _mean([r[key] for r in rows if r["layer"] == layer and r["experience"] == last and r["task"] < last])

    layers = {}
    for layer in order["feat"]:
        layers[layer] = {
            "cka": old(tables["cka"], layer, "cka"),
            "feature_rel_l2": old(tables["drift"], layer, "rel_l2"),
            "feature_cosine": old(tables["drift"], layer, "cosine"),
            "prototype_rel_l2": old(tables["drift"], layer, "proto_rel_l2"),
        }
    metric = "z" if all("z" in r for r in tables["bn"]) else "rel_l2"
    used = [r for r in tables["bn"] if r.get("variant", "used") == "used"]
    bn = {
        layer: {
            "old_tasks": old(used, layer, metric),
            "current_task": _mean([r[metric] for r in used if r["layer"] == layer and r["experience"] == last and r["task"] == last]),
        }
        for layer in order["bn"]
    }
    variants = sorted({r["variant"] for r in tables["bn"]} - {"used"})
    bn_variants = {v: {layer: old([r for r in tables["bn"] if r["variant"] == v], layer, metric) for layer in order["bn"]} for v in variants}
    curve = {
        layer: [_mean([r["cka"] for r in tables["cka"] if r["layer"] == layer and r["experience"] == k and r["task"] < k]) for k in range(last + 1)]
        for layer in order["feat"]
    }
    return {"last_experience": last, "layers": layers, "bn": bn, "bn_variants": bn_variants, "bn_metric": metric, "cka_curve": curve}


def _fmt(v: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def analyse_run(run_dir: Any, debiased: bool = False, kernel: str = "linear", out: Any = None) -> dict[str, Any]:
    """Tables (CSV, Markdown, JSON) and plots of a run's saved probes, in ``<run_dir>/shift/``."""
    import csv
    import io
    import json
    from pathlib import Path

    from cl.analysis.plots import bn_error_by_layer, cka_by_layer, cka_over_experiences
    from cl.errors import UserError

    run_dir = Path(run_dir)
    probes, order = load_probes(run_dir)
    if not probes:
        raise UserError(f"{run_dir}: no probes saved (run with shift.enabled: true)")
    tables = shift_tables(probes, debiased=debiased, kernel=kernel)
    summary = summarize_shift(tables, order)
    summary.update(kernel=kernel, debiased=debiased)
    from cl.utils import atomic_write_text

    out = Path(out) if out else run_dir / "shift"
    if (out.is_symlink() and not out.exists()) or (out / "plots").is_symlink():
        raise UserError(f"{out}: a symlink in the output path; refusing to write through it")
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        if rows:  # files are replaced, never written through a planted symlink
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
            atomic_write_text(out / f"{name}.csv", buf.getvalue())
    atomic_write_text(out / "shift.json", json.dumps(summary, indent=2))
    lines = [
        f"# Representational shift: {run_dir}",
        "",
        f"After the last experience ({summary['last_experience'] + 1}), mean over the tasks learned before it; "
        f"{'debiased ' if debiased else ''}{kernel} CKA against each task's features right after it was learned.",
        "",
        "| layer | CKA | feature drift (rel. L2) | feature drift (1 - cos) | prototype drift (rel. L2) |",
        "|---|---|---|---|---|",
    ]
    for layer, v in summary["layers"].items():
        lines.append(f"| {layer} | {_fmt(v['cka'])} | {_fmt(v['feature_rel_l2'])} | {_fmt(v['feature_cosine'])} | {_fmt(v['prototype_rel_l2'])} |")
    if summary["bn"]:
        variants = list(summary["bn_variants"])
        unit = "in standard deviations of the normalised output, mean over channels" if summary["bn_metric"] == "z" else "relative L2"
        lines += [
            "",
            "Error of the BatchNorm running mean used at test time against the true mean of the task's data through the current "
            f"network ({unit})" + (f"; also what {', '.join(variants)} BN would use:" if variants else ":"),
            "",
            "| BatchNorm layer | old tasks | current task |" + "".join(f" old tasks, {v} |" for v in variants),
            "|---|---|---|" + "---|" * len(variants),
        ]
        for layer, v in summary["bn"].items():
            extra = "".join(f" {_fmt(summary['bn_variants'][var][layer])} |" for var in variants)
            lines.append(f"| {layer} | {_fmt(v['old_tasks'])} | {_fmt(v['current_task'])} |{extra}")
        if variants:
            lines += ["", "| mean over layers | " + " | ".join(["used"] + variants) + " |", "|---|" + "---|" * (len(variants) + 1),
                      "| old tasks | " + " | ".join(_fmt(_mean([v["old_tasks"] for v in summary["bn"].values()])) for _ in [0])
                      + "".join(f" | {_fmt(_mean(list(summary['bn_variants'][var].values())))}" for var in variants) + " |"]
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    title = f"{run_dir.parent.parent.name} / {run_dir.parent.name} / {run_dir.name}"
    cka_over_experiences(tables["cka"], order["feat"], out / "cka_task1.png", title)
    cka_by_layer(summary, out / "cka_by_layer.png", title)
    if tables["bn"]:
        series = {f"old tasks, {v} BN" for v in summary["bn_variants"]}
        bn_error_by_layer(summary, out / "bn_error_by_layer.png", title,
                          series={f"old tasks, {v} BN": vals for v, vals in summary["bn_variants"].items()} if series else None)
    return summary
