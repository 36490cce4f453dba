"""The figures the stages draw: loss and RL curves, cross-attention heat maps, Table 1's bars, the
reward diagnostic.
matplotlib is imported on the first plot, on its file-only backend (no display needed)."""
from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display needed), imported on first plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(rows: list[dict], keys: list[str], path: Path, title: str):
    """One line per metric key against the step; metrics logged only sometimes are drawn with markers."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        if pts:
            ax.plot(*zip(*pts), marker="o" if len(pts) < 50 else None, label=k)
    ax.set_xlabel("step"), ax.set_title(title), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rl(rows: list[dict], path: Path):
    """The RL run at a glance: reward and its terms, KL to the reference, response length."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    panels = [(["reward", "coverage", "focus", "repeat", "rm"], "reward terms"), (["kl"], "KL(π ‖ π_SFT) per response"),
              (["length"], "response length (tokens)")]
    steps = [r["step"] for r in rows]
    for ax, (keys, title) in zip(axes, panels):
        for k in [k for k in keys if k in rows[0]]:  # a learned reward has "rm", not the attention terms
            ax.plot(steps, [r[k] for r in rows], label=k)
        ax.set_xlabel("iteration"), ax.set_title(title), ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_attention(attn, prompt_pieces: list[str], response_pieces: list[str], path: Path, title: str):
    """Heat map of Ā [T, S]: one row per response token, one column per prompt token."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(0.45 * len(prompt_pieces) + 2, 0.35 * len(response_pieces) + 1.5))
    ax.imshow(attn, cmap="viridis", vmin=0, aspect="auto")
    ax.set_xticks(range(len(prompt_pieces)), prompt_pieces, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(response_pieces)), response_pieces, fontsize=8)
    ax.set_xlabel("prompt token j"), ax.set_ylabel("response step t"), ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_table1(results: dict, path: Path, order=None) -> None:
    """Bar chart: one panel per (data set, metric), one bar per method (in `order`, default the results'),
    error bars = the 95 % interval (mean ± std over seeds where a metric has none); No-RL's mean dashed."""
    plt = pyplot()
    metrics = ("relevance", "rouge_l", "oracle")
    fig, axes = plt.subplots(len(results), len(metrics), figsize=(4.2 * len(metrics), 3.4 * len(results)),
                             squeeze=False)
    for row, (dataset, methods) in zip(axes, results.items()):
        names = [m for m in (order or methods) if m in methods]
        for ax, metric in zip(row, metrics):
            cells = [methods[m][metric] for m in names]
            means = [c["mean"] for c in cells]
            errors = [[c["mean"] - c["ci95"][0] if "ci95" in c else c["std"] for c in cells],
                      [c["ci95"][1] - c["mean"] if "ci95" in c else c["std"] for c in cells]]
            ax.bar(range(len(names)), means, yerr=errors, capsize=3,
                   color=["tab:gray" if m == "no-rl" else "tab:blue" if "cagsr" in m else "tab:orange" for m in names])
            if "no-rl" in methods:
                ax.axhline(methods["no-rl"][metric]["mean"], color="black", lw=1, ls="--")
            ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
            ax.set_title(f"{dataset}: {metric} (95 % interval)", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_diagnostic(results: dict, path: Path) -> None:
    """Per data set: each reward's oracle agreement (0.5 = a coin) and its rank correlation with length."""
    plt = pyplot()
    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.4 * len(results)), squeeze=False)
    for row, (dataset, r) in zip(axes, results.items()):
        names = [n for n, m in r.items() if isinstance(m, dict) and "oracle_agreement" in m]
        for ax, key, title, ref, lim in ((row[0], "oracle_agreement", "agreement with the oracle", 0.5, (0, 1)),
                                         (row[1], "length_rho", "rank correlation with length", 0.0, (-1, 1))):
            ax.barh(range(len(names)), [r[n][key] for n in names],
                    color=["tab:blue" if "cagsr" in n or n in ("coverage", "focus", "−repeat") else "tab:orange"
                           for n in names])
            ax.axvline(ref, color="black", lw=1, ls="--")
            ax.set_xlim(*lim)
            ax.set_yticks(range(len(names)), names, fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"{dataset}: {title}", fontsize=10)
            ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
