"""Draw every diagram of the course into img/<name>.png, the same bytes on every run.

The course's pictures are drawn here, with boxes, arrows, text and simple shapes, and every number a picture shows
is computed here (the NF4 code values from normal quantiles, bits per parameter, ZeRO's memory per device, padding
shares). Nothing is random: the one block of "weights" is drawn from `random.Random(SEED)`, figure sizes and the
resolution are fixed, and the PNG files carry no software version or date.

    python img/diagrams.py            # (re)draw every image under img/ (what `make diagrams` runs)
    python img/diagrams.py --check    # redraw into a temporary folder and compare byte for byte;
                                      # exit status 1 and the name of the first image that differs
    python img/diagrams.py --out DIR  # draw somewhere else

Identical bytes need the same matplotlib (with the FreeType and DejaVu fonts it bundles) and Pillow (its zlib): each
PNG names the two versions in its "Comment" text chunk, and `--check` says so when they differ from this machine's.
After an upgrade, run `make diagrams` once and commit the images. The colours are Okabe and Ito's colour-blind-safe
palette.
"""
from __future__ import annotations

import argparse
import filecmp
import random
import sys
import tempfile
import textwrap
from pathlib import Path
from statistics import NormalDist

import matplotlib
import PIL

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Circle, FancyBboxPatch, Rectangle  # noqa: E402

IMG_DIR = Path(__file__).resolve().parent
# Written into every PNG: the bytes depend on these versions, and on nothing else of the machine.
DRAWN_WITH = f"img/diagrams.py with matplotlib {matplotlib.__version__} and Pillow {PIL.__version__}"
DPI = 100  # figure sizes below are in pixels: width_px / DPI inches
SEED = 0

# Okabe & Ito (2008), "Color Universal Design": distinguishable with every common colour-vision deficiency.
BLUE, ORANGE, SKY, GREEN = "#0072B2", "#E69F00", "#56B4E9", "#009E73"
VERMILLION, PURPLE, YELLOW, GREY = "#D55E00", "#CC79A7", "#F0E442", "#7F7F7F"
INK, MUTED = "#1A1A1A", "#4D4D4D"


def tint(colour: str, amount: float) -> str:
    """`colour` mixed with white: amount 0 is the colour, 1 is white."""
    rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * amount):02X}" for c in rgb)


FROZEN, FROZEN_EDGE = "#E6E6E6", "#8C8C8C"  # frozen weights are grey in every picture
TRAINED, TRAINED_EDGE = tint(ORANGE, 0.55), VERMILLION  # what learns is orange


# ---------------------------------------------------------------------------------------------
# Drawing primitives: one axes over the whole figure, one data unit = one pixel, y upwards
# ---------------------------------------------------------------------------------------------

def canvas(width: int, height: int):
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    return fig, ax


def box(ax, x, y, w, h, *, fc="white", ec=INK, lw=1.5, radius=8, ls="-", z=2):
    """A rounded rectangle with its lower left corner at (x, y)."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=f"round,pad=0,rounding_size={radius}",
                                fc=fc, ec=ec, lw=lw, ls=ls, zorder=z))


def cell(ax, x, y, w, h, *, fc, ec=INK, lw=0.8, hatch=None, z=3):
    ax.add_patch(Rectangle((x, y), w, h, fc=fc, ec=ec, lw=lw, hatch=hatch, zorder=z))


def text(ax, x, y, s, *, size=12, ha="center", va="center", color=INK, weight="normal", z=5, **kw):
    ax.text(x, y, s, fontsize=size, ha=ha, va=va, color=color, fontweight=weight, zorder=z, **kw)


def arrow(ax, start, end, *, color=INK, lw=1.8, style="-|>", ls="-", rad=0.0, z=4):
    ax.annotate("", xy=end, xytext=start, zorder=z,
                arrowprops=dict(arrowstyle=style, color=color, lw=lw, ls=ls, mutation_scale=16,
                                shrinkA=0, shrinkB=0, connectionstyle=f"arc3,rad={rad}"))


def elbow(ax, points, *, color=INK, lw=1.8, ls="-"):
    """A polyline through `points` whose last segment ends in an arrow head."""
    xs, ys = zip(*points[:-1])
    ax.plot(xs, ys, color=color, lw=lw, ls=ls, solid_capstyle="butt", zorder=4)
    arrow(ax, points[-2], points[-1], color=color, lw=lw, ls=ls)


def legend(fig, ax, x, y, items, *, size=11, gap=28):
    """A row of (label, fill, edge) swatches starting at (x, y), spaced by the labels' measured widths."""
    renderer = fig.canvas.get_renderer()
    for label, fc, ec in items:
        cell(ax, x, y - 8, 22, 16, fc=fc, ec=ec, lw=1.5)
        t = ax.text(x + 30, y, label, fontsize=size, ha="left", va="center", color=INK, zorder=5)
        x = t.get_window_extent(renderer).x1 + gap


def heading(ax, height, title: str, caption: str, width: int):
    """The title at the top left and the caption line at the bottom left of every picture."""
    text(ax, 24, height - 26, title, size=16, ha="left", weight="bold")
    ax.plot([24, width - 24], [30, 30], color="#CCCCCC", lw=0.8, zorder=1)
    text(ax, 24, 15, caption, size=10, ha="left", color=MUTED)


# ---------------------------------------------------------------------------------------------
# The numbers the pictures show
# ---------------------------------------------------------------------------------------------

NF4_OFFSET = 0.9677083  # bitsandbytes' create_normal_map: the outermost quantile used (lesson 03, section 1)


def _quantile_probabilities(n: int) -> list[float]:
    """torch.linspace(NF4_OFFSET, 0.5, n)[:-1] in float64: n - 1 probabilities from the offset towards 0.5."""
    return [NF4_OFFSET + (0.5 - NF4_OFFSET) * i / (n - 1) for i in range(n - 1)]


def nf4_values() -> list[float]:
    """The 16 NF4 code values, built as QLoRA (arXiv:2305.14314, section 3) and bitsandbytes build them.

    8 positive quantiles of N(0, 1) at probabilities evenly spaced from NF4_OFFSET towards 0.5, 7 negative ones the
    same way, an exact 0, all divided by the largest, sorted.
    """
    quantile = NormalDist().inv_cdf
    positive = [quantile(p) for p in _quantile_probabilities(9)]
    negative = [-quantile(p) for p in _quantile_probabilities(8)]
    values = sorted(positive + [0.0] + negative)
    return [v / values[-1] for v in values]


def bitsandbytes_nf4() -> list[float] | None:
    """bitsandbytes' own NF4 table (`bitsandbytes.functional.get_4bit_type("nf4")`), or None without it."""
    try:
        from bitsandbytes.functional import get_4bit_type
    except Exception:  # not installed, or no usable build on this machine
        return None
    return get_4bit_type("nf4", device="cpu").tolist()


def bits_per_parameter(block: int = 64, block2: int = 256, double: bool = False) -> float:
    """4-bit codes plus the quantization constants, per weight (QLoRA, section 3 "Double Quantization")."""
    if not double:
        return 4 + 32 / block  # one fp32 absmax per block
    return 4 + 8 / block + 32 / (block * block2)  # 8-bit absmax; one fp32 scale per block2 of them


ZERO_K = 12  # bytes of Adam state per parameter in mixed precision: fp32 master copy, momentum, variance


def zero_bytes_per_device(stage: int, psi: float, n: int, k: int = ZERO_K) -> float:
    """Model states per device (ZeRO, Rajbhandari et al., arXiv:1910.02054, section 5 and Figure 1)."""
    return {0: (2 + 2 + k) * psi,
            1: 2 * psi + 2 * psi + k * psi / n,
            2: 2 * psi + (2 + k) * psi / n,
            3: (2 + 2 + k) * psi / n}[stage]


EXAMPLE_COLOURS = [tint(BLUE, 0.45), tint(SKY, 0.5), tint(GREEN, 0.5)]  # neighbours in a packed block differ
EXAMPLE_LENGTHS = [7, 19, 4, 12, 16, 5, 10, 14]  # eight examples' token counts, in dataset order
BATCH, FIXED_LENGTH, BLOCK = 4, 24, 24


def first_fit(lengths: list[int], block: int) -> list[list[int]]:
    """Pack example indices into blocks of `block` tokens: each example into the first block with room."""
    blocks: list[list[int]] = []
    for i, length in enumerate(lengths):
        for b in blocks:
            if sum(lengths[j] for j in b) + length <= block:
                b.append(i)
                break
        else:
            blocks.append([i])
    return blocks


# ---------------------------------------------------------------------------------------------
# The diagrams
# ---------------------------------------------------------------------------------------------

# (number, name in README's table, one-line topic, part of the course)
COURSE = [
    ("00", "Setup and tour", "environment, base model, tokenizer, data, loss mask", "start"),
    ("01", "LoRA from scratch", "LoRA = peft, in a layer and a model; r, α, targets; rsLoRA, DoRA", "peft"),
    ("02", "Fine-tuning with LoRA", "the Trainer; learned or not; save, merge, resume; the recipe", "peft"),
    ("03", "NF4 and double quantization", "NF4 and double quantization = bitsandbytes; memory from a config", "peft"),
    ("04", "QLoRA training", "4-bit base + LoRA on chats; paged AdamW; the 7B recipe", "peft"),
    ("05", "P-Tuning v2", "prefixes in every layer, from scratch = peft; the GLM-4 recipe", "peft"),
    ("06", "Four methods in one table", "LoRA vs P-Tuning v2 vs Freeze vs full; merging checkpoints", "peft"),
    ("07", "DeepSpeed ZeRO", "what each GPU keeps in stages 0–3; the config", "scale"),
    ("08", "Multi-GPU training", "2-process runs, checkpoints, launchers", "scale"),
    ("09", "RLHF: reward model and PPO", "a reward model; PPO written out", "align"),
    ("10", "DPO and GRPO", "preference tuning without PPO; three methods compared", "align"),
    ("11", "Evaluation", "BLEU-4, Chinese ROUGE, accuracy, perplexity", "use"),
    ("12", "Merge and export", "merged safetensors, 4-bit bases, PiSSA, TIES/DARE", "use"),
    ("13", "Chat and API", "chat templates, a chat box, an OpenAI-compatible server", "use"),
    ("14", "Speed and memory", "memory model, tokens/s, padding vs packing", "scale"),
]
PARTS = {"start": ("getting started", YELLOW, "#B8A800"), "peft": ("parameter-efficient tuning", SKY, SKY),
         "scale": ("memory, devices, speed", ORANGE, ORANGE), "align": ("learning from preferences", GREEN, GREEN),
         "use": ("evaluation and use", PURPLE, PURPLE)}


def course_map():
    w, h, margin, gap_y = 356, 118, 30, 48
    rows = -(-len(COURSE) // 3)
    width, height = 1200, 62 + rows * (h + gap_y) + 66
    fig, ax = canvas(width, height)
    heading(ax, height, f"The course map: {len(COURSE)} notebooks, in order",
            "Each box is notebooks/NN_*.ipynb with its theory in lessons/NN_*.md; the colour is the part of the "
            "course it belongs to. Drawn by img/diagrams.py.", width)
    top = height - 62
    gap_x = (width - 2 * margin - 3 * w) / 2
    corners = []
    for i, (number, name, topic, part) in enumerate(COURSE):
        row, col = divmod(i, 3)
        x, y = margin + col * (w + gap_x), top - h - row * (h + gap_y)
        colour, edge = tint(PARTS[part][1], 0.72), PARTS[part][2]
        box(ax, x, y, w, h, fc=colour, ec=edge, lw=2)
        ax.add_patch(Circle((x + 32, y + h - 32), 21, fc="white", ec=INK, lw=1.4, zorder=3))
        text(ax, x + 32, y + h - 32, number, size=15, weight="bold")
        title = textwrap.wrap(name, 24, break_on_hyphens=False)
        text(ax, x + 62, y + h - 14, "\n".join(title), size=13, ha="left", va="top", weight="bold",
             linespacing=1.15)
        below = y + h - 14 - 21 * len(title) - 8
        topic_lines = textwrap.wrap(topic, 36, break_on_hyphens=False)
        text(ax, x + 62, below, "\n".join(topic_lines), size=11, ha="left", va="top", linespacing=1.25)
        corners.append((x, y))
    for i in range(len(COURSE) - 1):
        (x0, y0), (x1, y1) = corners[i], corners[i + 1]
        if y0 == y1:  # next box on the same row
            arrow(ax, (x0 + w + 3, y0 + h / 2), (x1 - 3, y1 + h / 2), lw=2)
        else:  # down to the next row's first box
            mid = y0 - gap_y / 2
            elbow(ax, [(x0 + w / 2, y0 - 2), (x0 + w / 2, mid), (x1 + w / 2, mid), (x1 + w / 2, y1 + h + 3)], lw=2)
    legend(fig, ax, margin, 58, gap=22,
           items=[(label, tint(colour, 0.72), edge) for label, colour, edge in PARTS.values()])
    return fig


def lora():
    width, height = 1100, 540
    fig, ax = canvas(width, height)
    d, k, r, alpha = 4096, 4096, 8, 16
    full, low_rank = d * k, r * (d + k)
    heading(ax, height, "LoRA: a frozen weight plus a trainable low-rank update",
            "Hu et al. 2021 (arXiv:2106.09685): W₀ is d × k (d = d_out, k = d_in), B is d × r, A is r × k, "
            "r ≪ min(d, k). Shapes drawn to scale for d = k, r = d / 16.", width)
    S = 150  # pixels for d and k
    R = S // 16
    xc, top_y, bot_y = 260, 370, 150  # the input's centre; the two paths
    # input x
    cell(ax, 30, xc - S / 2, 26, S, fc=tint(BLUE, 0.75), ec=BLUE, lw=1.5)
    text(ax, 43, xc - S / 2 - 18, "x", size=15, weight="bold")
    text(ax, 43, xc + S / 2 + 14, "k values", size=11)
    # frozen path
    wx = 200
    cell(ax, wx, top_y - S / 2, S, S, fc=FROZEN, ec=FROZEN_EDGE, lw=2)
    text(ax, wx + S / 2, top_y + 16, "$W_0$", size=24)
    text(ax, wx + S / 2, top_y - 24, "d × k", size=14)
    text(ax, wx + S / 2, top_y + S / 2 + 16, "frozen: no gradient, no optimizer state", size=11, color=MUTED)
    elbow(ax, [(60, xc + 40), (130, xc + 40), (130, top_y), (wx - 4, top_y)])
    # low-rank path: A (r × k) then B (d × r)
    ax_ = 170
    cell(ax, ax_, bot_y - R / 2, S, R, fc=TRAINED, ec=TRAINED_EDGE, lw=2)
    text(ax, ax_ + S / 2, bot_y - R / 2 - 18, "A   r × k   (random at start)", size=12)
    elbow(ax, [(60, xc - 40), (130, xc - 40), (130, bot_y), (ax_ - 4, bot_y)])
    bx = 400
    cell(ax, bx, bot_y - S / 2, R, S, fc=TRAINED, ec=TRAINED_EDGE, lw=2)
    text(ax, bx + R + 10, bot_y + S / 2 - 10, "B   d × r", size=12, ha="left")
    text(ax, bx + R + 10, bot_y + S / 2 - 30, "(zeros at start: BA = 0)", size=11, ha="left", color=MUTED)
    arrow(ax, (ax_ + S + 4, bot_y), (bx - 4, bot_y))
    text(ax, (ax_ + S + bx) / 2, bot_y + 13, "r values", size=10.5, color=MUTED)
    # scaling and sum
    sx = 520
    ax.add_patch(Circle((sx, bot_y), 28, fc=TRAINED, ec=TRAINED_EDGE, lw=2, zorder=3))
    text(ax, sx, bot_y, "× α/r", size=12)
    arrow(ax, (bx + R + 4, bot_y), (sx - 30, bot_y))
    px = 600
    ax.add_patch(Circle((px, xc), 22, fc="white", ec=INK, lw=2, zorder=3))
    text(ax, px, xc + 1, "+", size=22)
    elbow(ax, [(wx + S + 4, top_y), (px, top_y), (px, xc + 24)])
    elbow(ax, [(sx + 30, bot_y), (px, bot_y), (px, xc - 24)])
    cell(ax, 650, xc - S / 2, 26, S, fc=tint(BLUE, 0.75), ec=BLUE, lw=1.5)
    arrow(ax, (px + 24, xc), (646, xc))
    text(ax, 663, xc - S / 2 - 18, "h", size=15, weight="bold")
    text(ax, 663, xc + S / 2 + 14, "d values", size=11)
    # the formula and the counts
    tx = 730
    text(ax, tx, 460, r"$h = W_0\,x + \frac{\alpha}{r}\,B\,A\,x$", size=20, ha="left")
    lines = [
        ("Trainable per layer: r·(d + k)", "bold"),
        (f"d = k = {d:,}, r = {r}:", "normal"),
        (f"{low_rank:,} instead of {full:,}", "normal"),
        (f"({100 * low_rank / full:.2f}% of a full update)", "normal"),
        ("", "normal"),
        ("α/r: a new r needs little retuning", "normal"),
        (f"(here α = {alpha}, r = {r}: × {alpha / r:g})", "normal"),
        ("", "normal"),
        ("After training: W = W₀ + (α/r)·BA", "bold"),
        ("is one matrix again (merge_and_unload):", "normal"),
        ("no extra latency when serving.", "normal"),
    ]
    for i, (line, weight) in enumerate(lines):
        text(ax, tx, 400 - 25 * i, line, size=12, ha="left", weight=weight)
    legend(fig, ax, 30, 60, [("frozen", FROZEN, FROZEN_EDGE), ("trained", TRAINED, TRAINED_EDGE),
                             ("activations", tint(BLUE, 0.75), BLUE)])
    return fig


def nf4():
    width, height = 1100, 840
    fig, ax = canvas(width, height)
    values = nf4_values()
    z_max = NormalDist().inv_cdf(NF4_OFFSET)
    heading(ax, height, "NF4: 16 levels at the quantiles of a normal distribution, one absmax per block of 64",
            "Levels as QLoRA (arXiv:2305.14314, section 3) and bitsandbytes' create_normal_map compute them; "
            f"the block: 64 draws from N(0, 0.02²), seed {SEED}.", width)
    # Panel 1: the density of block-normalised weights, the levels, equal-mass bands
    pos_mass = (NF4_OFFSET - 0.5) / 8
    neg_mass = (NF4_OFFSET - 0.5) / 7
    p1 = fig.add_axes((0.05, 0.565, 0.9, 0.33))
    scale = 1 / z_max  # a N(0,1) weight divided by the absmax z_max; levels in these units
    grid = [-1.25 + 2.5 * i / 600 for i in range(601)]
    dens = NormalDist(0, scale)
    p1.plot(grid, [dens.pdf(x) for x in grid], color=INK, lw=1.6, zorder=3)
    for i in range(15):
        lo, hi = values[i], values[i + 1]
        xs = [lo + (hi - lo) * j / 40 for j in range(41)]
        colour = tint(BLUE, 0.45) if i % 2 else tint(SKY, 0.65)
        p1.fill_between(xs, [dens.pdf(x) for x in xs], color=colour, lw=0, zorder=1)
    for v in values:
        p1.axvline(v, color=VERMILLION, lw=1.2, ymax=0.86, zorder=2)
    p1.set_xlim(-1.25, 1.25)
    p1.set_ylim(0, dens.pdf(0) * 1.16)
    p1.set_yticks([])
    p1.set_xticks(values)
    p1.set_xticklabels([f"{v:.2f}".replace("-", "−") for v in values], fontsize=9.5, rotation=90)
    for side in ("top", "right", "left"):
        p1.spines[side].set_visible(False)
    p1.set_xlabel("weight ÷ its block's absmax: the 16 NF4 levels (4-bit codes 0 … 15, left to right)", fontsize=11)
    top = dens.pdf(0) * 1.08
    p1.text(1.24, top, f"right of 0: 8 bands of {100 * pos_mass:.2f}% of the mass", fontsize=11, ha="right")
    p1.text(-1.24, top, f"left of 0: 7 bands of {100 * neg_mass:.2f}%", fontsize=11, ha="left")
    p1.text(1.04, dens.pdf(1.0) + 0.3, f"1 = {z_max:.3f} σ,\nthe {NF4_OFFSET:.4f}\nquantile", fontsize=10,
            ha="left", color=MUTED)
    # Panel 2: one block of 64 weights, its absmax and the nearest levels
    rng = random.Random(SEED)
    weights = [NormalDist(0, 0.02).inv_cdf(rng.random()) for _ in range(64)]
    absmax = max(abs(w) for w in weights)
    codes = [min(range(16), key=lambda i: abs(values[i] - w / absmax)) for w in weights]
    p2 = fig.add_axes((0.07, 0.1, 0.6, 0.32))
    for v in values:
        p2.axhline(v * absmax, color=tint(VERMILLION, 0.55), lw=0.8, zorder=1)
    p2.bar(range(64), weights, width=0.75, color=tint(BLUE, 0.35), zorder=2, label="weight w")
    p2.scatter(range(64), [values[c] * absmax for c in codes], s=16, color=VERMILLION, zorder=3,
               label="ŵ = nearest level × absmax")
    big = max(range(64), key=lambda j: abs(weights[j]))
    p2.annotate(f"|w| largest: absmax = {absmax:.4f}", (big + 0.5, weights[big]), xytext=(big - 4, weights[big]),
                fontsize=11, arrowprops=dict(arrowstyle="-|>", color=INK, lw=1.2), va="center", ha="right")
    p2.set_xlim(-1, 64)
    p2.set_ylim(-absmax * 1.12, absmax * 1.12)
    p2.set_xticks([0, 16, 32, 48, 63])
    p2.tick_params(labelsize=10)
    p2.set_xlabel("one block: weights 0 … 63", fontsize=11)
    for side in ("top", "right"):
        p2.spines[side].set_visible(False)
    p2.legend(loc="lower right", fontsize=10.5, frameon=False, ncol=2, bbox_to_anchor=(1.0, 1.0),
              handletextpad=0.3, columnspacing=1.2)
    text(ax, 24, 385, "One block of 64 weights", size=13, ha="left", weight="bold")
    # Panel 3: what the block stores
    tx = 770
    text(ax, tx, 385, "What a block stores", size=13, ha="left", weight="bold")
    for j in range(32):
        cell(ax, tx + j * 9, 320, 9, 24, fc=tint(SKY, 0.6), ec=BLUE, lw=0.5)
    text(ax, tx, 304, "32 bytes: 64 codes of 4 bits", size=11.5, ha="left")
    cell(ax, tx, 250, 72, 26, fc=tint(ORANGE, 0.55), ec=VERMILLION, lw=1.2)
    text(ax, tx + 36, 263, "absmax", size=11)
    text(ax, tx + 84, 263, "+ one fp32: 4 bytes", size=11.5, ha="left")
    lines = ["code = the level nearest to w / absmax",
             "ŵ = level[code] × absmax",
             "",
             f"(64·4 + 32) / 64 = {bits_per_parameter():g} bits per weight;",
             "double quantization (section 2)",
             "shrinks the 32"]
    for i, line in enumerate(lines):
        text(ax, tx, 215 - 24 * i, line, size=11.5, ha="left")
    return fig


def double_quantization():
    width, height = 1100, 560
    fig, ax = canvas(width, height)
    single, double = bits_per_parameter(), bits_per_parameter(double=True)
    saved = single - double
    psi, per = 65e9, 64 * 256
    heading(ax, height, "Double quantization: the absmax constants, quantized again to 8 bits",
            "QLoRA (arXiv:2305.14314, section 3; the 8-bit map is bitsandbytes' dynamic one). The paper: 0.373 bits "
            "a weight, about 3 GB for 65B.", width)
    x0 = 30
    # level 1: the weights in blocks of 64
    text(ax, x0, 488, "1 · The weights, in blocks of 64", size=13, ha="left", weight="bold")
    for b in range(5):
        x = x0 + b * 96
        for j in range(8):
            cell(ax, x + j * 11, 430, 11, 26, fc=tint(SKY, 0.6), ec=BLUE, lw=0.5)
        cell(ax, x + 20, 380, 48, 22, fc=tint(ORANGE, 0.55), ec=VERMILLION, lw=1.2)
        arrow(ax, (x + 44, 428), (x + 44, 404), lw=1.2)
    text(ax, x0 + 5 * 96, 443, "…  4-bit codes, 64 each", size=11, ha="left")
    text(ax, x0 + 5 * 96, 391, "…  one fp32 absmax each", size=11, ha="left")
    # level 2: the absmax values, in blocks of 256
    text(ax, x0, 338, "2 · The absmax values, in blocks of 256", size=13, ha="left", weight="bold")
    text(ax, x0, 316, "their mean subtracted first (one fp32 offset per tensor)", size=10.5, ha="left", color=MUTED)
    arrow(ax, (x0 + 4 * 96 + 44, 378), (x0 + 4 * 96 + 44, 284), color=VERMILLION, lw=1.6)
    for b in range(3):
        x = x0 + b * 170
        for j in range(16):
            cell(ax, x + j * 10, 254, 10, 26, fc=tint(ORANGE, 0.7), ec=VERMILLION, lw=0.5)
        cell(ax, x + 52, 204, 56, 22, fc=tint(GREEN, 0.6), ec=GREEN, lw=1.2)
        arrow(ax, (x + 80, 252), (x + 80, 228), lw=1.2)
    text(ax, x0 + 3 * 170, 267, "…  8-bit codes", size=11, ha="left")
    text(ax, x0 + 3 * 170, 215, "…  one fp32 scale each", size=11, ha="left")
    # the accounting, as bars
    text(ax, x0, 160, "Bits per weight", size=13, ha="left", weight="bold")
    parts = {"without": [(4.0, tint(SKY, 0.6), BLUE), (32 / 64, tint(ORANGE, 0.55), VERMILLION)],
             "with": [(4.0, tint(SKY, 0.6), BLUE), (8 / 64, tint(ORANGE, 0.7), VERMILLION),
                      (32 / (64 * 256), tint(GREEN, 0.6), GREEN)]}
    formulas = {"without": f"4 + 32/64 = {single:.3f}", "with": f"4 + 8/64 + 32/(64·256) = {double:.3f}"}
    px = 100  # pixels per bit
    for y, label in [(112, "without"), (62, "with")]:
        text(ax, x0, y + 11, label, size=12, ha="left")
        x = x0 + 70
        for bits, fc, ec in parts[label]:
            cell(ax, x, y, bits * px, 22, fc=fc, ec=ec, lw=1)
            x += bits * px
        text(ax, x0 + 70 + 4.5 * px + 14, y + 11, formulas[label], size=12, ha="left", weight="bold")
    # the numbers, spelled out
    tx = 740
    text(ax, tx, 488, f"Per 64 × 256 = {per:,} weights", size=13, ha="left", weight="bold")
    lines = [f"codes: {per:,} × 4 = {per * 4:,} bits",
             f"absmax in fp32: 256 × 32 = {256 * 32:,} bits",
             "absmax in 8 bits: 256 × 8, plus one",
             f"  32-bit scale = {256 * 8 + 32:,} bits",
             "",
             f"{single:.3f} → {double:.3f} bits per weight:",
             f"{saved:.3f} bits ({100 * saved / single:.1f}%) fewer, {saved * psi / 8 / 1e9:.2f} GB",
             "for 65B weights",
             "",
             "The notebook counts these bits in the",
             "tensors bitsandbytes stores, and shows",
             "that the weights' error barely moves."]
    for i, line in enumerate(lines):
        text(ax, tx, 452 - 25 * i, line, size=11.5, ha="left")
    return fig


def ptuning_prefix():
    width, height = 1100, 640
    fig, ax = canvas(width, height)
    n_prefix, n_tokens = 4, 7
    heading(ax, height, "P-Tuning v2: trainable keys and values prepended at every layer",
            "Liu et al. 2022 (arXiv:2110.07602). Drawn with N = pre_seq_len = 4 (ChatGLM2's recipe uses 128) "
            "and 7 tokens; the model's weights stay frozen.", width)
    cw, ch = 30, 22
    lx = 330  # left edge of the key/value cells
    mid = lx + (n_prefix + n_tokens / 2) * cw  # centre of the tokens' columns
    layers = [("1", 136), ("2", 262), ("L", 414)]
    for name, y in layers:
        box(ax, 180, y, 520, 90, fc=tint("#BBBBBB", 0.75), ec=FROZEN_EDGE, lw=1.5)
        text(ax, 192, y + 74, f"layer {name} · attention (frozen weights)", size=11.5, ha="left", weight="bold")
        for label, ty in [("values", y + 8), ("keys", y + 36)]:
            text(ax, lx - 10, ty + ch / 2, label, size=11, ha="right")
            for j in range(n_prefix):
                cell(ax, lx + j * cw, ty, cw, ch, fc=TRAINED, ec=TRAINED_EDGE, lw=1)
            for j in range(n_tokens):
                cell(ax, lx + (n_prefix + j) * cw, ty, cw, ch, fc=tint(BLUE, 0.7), ec=BLUE, lw=0.8)
        # the prefix table's slice for this layer, and where it goes
        cell(ax, 30, y + 8, 76, 50, fc=TRAINED, ec=TRAINED_EDGE, lw=1.2)
        text(ax, 68, y + 33, f"$P^K_{name},\\ P^V_{name}$", size=12)
        arrow(ax, (108, y + 32), (lx - 2, y + 32), color=VERMILLION, lw=1.5)
    text(ax, 68, 375, "⋮", size=20)
    text(ax, mid, 375, "⋮", size=20)
    arrow(ax, (mid, 236), (mid, 260), lw=1.5)
    arrow(ax, (mid, 354), (mid, 366), lw=1.5)
    arrow(ax, (mid, 392), (mid, 412), lw=1.5)
    text(ax, lx + n_prefix * cw / 2, 518, "$P^K_l,\\ P^V_l$: N each", size=11.5)
    text(ax, mid, 518, "$K_l,\\ V_l$ of the tokens", size=11.5)
    text(ax, 30, 560, "The prefix table", size=13, ha="left", weight="bold")
    text(ax, 30, 538, "N × 2·L·k values: all that is saved", size=10.5, ha="left", color=MUTED)
    # the tokens: no virtual tokens in the input
    for j in range(n_tokens):
        cell(ax, lx + (n_prefix + j) * cw, 86, cw, ch, fc="white", ec=INK, lw=1)
        text(ax, lx + (n_prefix + j + 0.5) * cw, 97, f"$x_{j + 1}$", size=11)
    arrow(ax, (mid, 110), (mid, 134), lw=1.5)
    text(ax, lx + n_prefix * cw - 8, 97, "input tokens", size=11, ha="right")
    # what it means
    tx = 735
    lines = [("Every layer attends to N more keys", "bold"),
             (r"$\mathrm{head}_l = \mathrm{softmax}(q\,[P^K_l;\,K_l]^\top/\sqrt{d_h})\,[P^V_l;\,V_l]$", "math"),
             ("Given to the model as past_key_values;", "normal"),
             ("the attention mask gets N ones in front.", "normal"),
             ("", "normal"),
             ("No input positions used", "bold"),
             ("The tokens stay x₁ … xₙ. Prompt tuning", "normal"),
             ("and P-Tuning v1 learn N input", "normal"),
             ("embeddings, at the first layer only.", "normal"),
             ("", "normal"),
             ("Reparameterisation (optional)", "bold"),
             ("prefix_projection: Embedding(N, e) →", "normal"),
             ("Linear → tanh → Linear makes the table", "normal"),
             ("while training; only the table is kept.", "normal")]
    y = 560
    for line, kind in lines:
        if kind == "math":
            text(ax, tx, y - 4, line, size=11.5, ha="left")
            y -= 36
            continue
        text(ax, tx, y, line, size=12 if kind == "bold" else 11, ha="left",
             weight="bold" if kind == "bold" else "normal")
        y -= 26 if kind == "bold" else 23
    legend(fig, ax, 30, 56, [("frozen", FROZEN, FROZEN_EDGE), ("trained", TRAINED, TRAINED_EDGE),
                             ("computed from the tokens by the frozen model", tint(BLUE, 0.7), BLUE)])
    return fig


def zero_stages():
    width, height = 1100, 640
    fig, ax = canvas(width, height)
    psi, n_fig, n_paper = 7.5e9, 4, 64
    heading(ax, height, "ZeRO stages 0–3: what each of N devices holds",
            f"Rajbhandari et al., ZeRO (arXiv:1910.02054), section 5 and Figure 1. K = {ZERO_K}: mixed-precision Adam. "
            f"Drawn for N = {n_fig} devices.", width)
    kinds = [("parameters (fp16) 2Ψ", BLUE), ("gradients (fp16) 2Ψ", ORANGE),
             (f"optimizer states KΨ = {ZERO_K}Ψ", GREEN)]
    stages = [(0, "0 · DDP", "nothing sharded", "(2 + 2 + K)Ψ"),
              (1, "1 · $P_{os}$", "optimizer states", "2Ψ + 2Ψ + KΨ/N"),
              (2, "2 · $P_{os+g}$", "+ gradients", "2Ψ + (2 + K)Ψ/N"),
              (3, "3 · $P_{os+g+p}$", "+ parameters", "(2 + 2 + K)Ψ/N")]
    col_x, col_w, bar_h = 200, 138, 14
    for d in range(n_fig):
        text(ax, col_x + d * (col_w + 14) + col_w / 2, 568, f"device {d}", size=12, weight="bold")
    text(ax, 880, 568, "per device", size=12, weight="bold")
    text(ax, 1030, 568, f"Ψ = 7.5B\nN = {n_paper}", size=12, weight="bold")
    for s, (stage, name, what, formula) in enumerate(stages):
        y = 480 - s * 118
        text(ax, 24, y + 26, name, size=13, ha="left", weight="bold")
        text(ax, 24, y + 4, what, size=11, ha="left", color=MUTED)
        for d in range(n_fig):
            x = col_x + d * (col_w + 14)
            box(ax, x - 6, y - 22, col_w + 12, 82, fc="white", ec="#BBBBBB", lw=1, radius=6, z=1)
            for i, (_, colour) in enumerate(kinds):
                by = y + 36 - i * (bar_h + 8)
                sharded = i >= 3 - stage  # stage 1 shards optimizer states, 2 adds gradients, 3 parameters
                cell(ax, x, by, col_w, bar_h, fc="white" if sharded else tint(colour, 0.3), ec=colour, lw=0.8)
                if sharded:
                    cell(ax, x + d * col_w / n_fig, by, col_w / n_fig, bar_h, fc=tint(colour, 0.3), ec=colour,
                         lw=0.8)
        text(ax, 880, y + 18, formula, size=12)
        gb = zero_bytes_per_device(stage, psi, n_paper) / 1e9
        text(ax, 1030, y + 18, f"{gb:.1f} GB", size=13, weight="bold")
    legend(fig, ax, 40, 60, [(label, tint(colour, 0.3), colour) for label, colour in kinds]
           + [("held by another device", "white", GREY)])
    return fig


def rlhf_dpo():
    width, height = 1100, 640
    fig, ax = canvas(width, height)
    heading(ax, height, "RLHF with PPO, and DPO's direct path from preference pairs to the policy",
            "InstructGPT's stages: Ouyang et al. 2022 (arXiv:2203.02155), Figure 2. DPO: Rafailov et al. 2023 "
            "(arXiv:2305.18290). Grey: frozen; orange: trained.", width)

    def node(x, y, w, h, title, sub, fc, ec, sub_size=10.5):
        box(ax, x, y, w, h, fc=fc, ec=ec, lw=2)
        lines = sub.split("\n") if sub else []
        text(ax, x + w / 2, y + h / 2 + 11 * len(lines), title, size=12.5, weight="bold")
        for i, line in enumerate(lines):
            text(ax, x + w / 2, y + h / 2 + 11 * len(lines) - 24 - 21 * i, line, size=sub_size)

    pi, ref, r_phi = r"$\pi_\theta$", r"$\pi_{ref}$", r"$r_\phi$"
    # stage 1, and the pairs
    node(30, 480, 210, 56, "pretrained model", "", FROZEN, FROZEN_EDGE)
    node(30, 330, 210, 70, "1 · SFT model", "on demonstrations", TRAINED, TRAINED_EDGE)
    arrow(ax, (135, 478), (135, 404))
    text(ax, 145, 441, "supervised\nfine-tuning", size=10.5, ha="left", color=MUTED)
    node(30, 170, 210, 70, "preference pairs", "x, chosen y⁺, rejected y⁻", "white", INK)
    # stage 2: the reward model
    node(290, 330, 220, 70, f"2 · reward model {r_phi}", "Bradley–Terry on the pairs", TRAINED, TRAINED_EDGE)
    arrow(ax, (242, 375), (286, 375))
    text(ax, 264, 386, "init", size=10, color=MUTED)
    elbow(ax, [(242, 205), (264, 205), (264, 350), (286, 350)])
    # stage 3: the PPO loop
    box(ax, 560, 270, 515, 292, fc=tint(SKY, 0.88), ec=BLUE, lw=1.5, ls="--", z=1)
    text(ax, 575, 542, "3 · PPO", size=13, ha="left", weight="bold", color=BLUE)
    node(590, 430, 200, 78, f"policy {pi}", "starts as the SFT model", TRAINED, TRAINED_EDGE)
    node(855, 430, 200, 78, "replies y", "sampled for prompts x", "white", BLUE)
    node(855, 300, 200, 92, "reward",
         r"$r_\phi(x, y) - \beta\,\log\,(\pi_\theta / \pi_{ref})$" + "\nKL penalty per token", "white", BLUE)
    node(590, 300, 200, 92, "PPO update", "value head, GAE,\nclipped objective", "white", BLUE)
    arrow(ax, (792, 469), (851, 469), color=BLUE, lw=2)
    arrow(ax, (955, 428), (955, 396), color=BLUE, lw=2)
    arrow(ax, (853, 346), (794, 346), color=BLUE, lw=2)
    arrow(ax, (690, 394), (690, 426), color=BLUE, lw=2)
    elbow(ax, [(400, 328), (400, 285), (920, 285), (920, 296)], lw=1.5)
    text(ax, 480, 294, "scores the replies", size=10.5, color=MUTED)
    # the reference model, shared by PPO and DPO
    node(590, 170, 200, 70, f"reference {ref}", "the SFT model, frozen", FROZEN, FROZEN_EDGE)
    elbow(ax, [(792, 205), (990, 205), (990, 296)], lw=1.5)
    text(ax, 1000, 240, f"log {ref}", size=11, ha="left")
    # DPO: pairs -> policy directly
    text(ax, 30, 130, "DPO", size=13, ha="left", weight="bold", color=VERMILLION)
    node(290, 56, 420, 90, "DPO loss",
         r"$-\log\sigma\left(\beta\log\frac{\pi_\theta(y^+)}{\pi_{ref}(y^+)}"
         r" - \beta\log\frac{\pi_\theta(y^-)}{\pi_{ref}(y^-)}\right)$", tint(VERMILLION, 0.8), VERMILLION,
         sub_size=12)
    elbow(ax, [(135, 168), (135, 101), (286, 101)], color=VERMILLION, lw=2)
    arrow(ax, (690, 168), (690, 150), color=VERMILLION, lw=1.5)
    node(800, 56, 255, 90, f"policy {pi}", "no reward model,\nno sampling", TRAINED, TRAINED_EDGE)
    arrow(ax, (712, 101), (796, 101), color=VERMILLION, lw=2)
    return fig


def padding_packing():
    width, height = 1100, 680
    fig, ax = canvas(width, height)
    lengths = EXAMPLE_LENGTHS
    heading(ax, height, "Dynamic padding, grouping by length, and packing: fewer wasted positions",
            f"Eight examples of {', '.join(map(str, lengths[:-1]))} and {lengths[-1]} tokens, in batches of {BATCH}. "
            "A step's cost grows with the positions it computes.", width)
    cw, ch = 19, 17

    def panel(x0, y0, title, rows, note):
        """rows: lists of (example index or None for padding, token count), drawn top to bottom."""
        text(ax, x0, y0 + 28, title, size=12.5, ha="left", weight="bold")
        y = y0
        tokens = positions = 0
        for row in rows:
            if row == "gap":
                y -= 10
                continue
            x = x0 + 22
            for example, count in row:
                if example is None:
                    for j in range(count):
                        cell(ax, x + j * cw, y - ch, cw, ch, fc="#F2F2F2", ec="#B3B3B3", lw=0.6)
                else:
                    fc = EXAMPLE_COLOURS[example % 3]
                    for j in range(count):
                        cell(ax, x + j * cw, y - ch, cw, ch, fc=fc, ec="white", lw=0.6)
                    text(ax, x + cw / 2, y - ch / 2, str(example + 1), size=9.5, weight="bold")
                    ax.plot([x, x], [y - ch, y], color=INK, lw=1.4, zorder=4)
                    tokens += count
                x += count * cw
                positions += count
            y -= ch + 3
        pad = positions - tokens
        text(ax, x0, y - 10, f"{positions} positions, {pad} padding ({100 * pad / positions:.0f}%)  {note}",
             size=11, ha="left")

    def padded(order, to):
        rows = []
        for b in range(0, len(order), BATCH):
            batch = order[b:b + BATCH]
            longest = max(lengths[i] for i in batch) if to is None else to
            rows += [[(i, lengths[i]), (None, longest - lengths[i])] for i in batch]
            rows.append("gap")
        return rows[:-1]

    order = list(range(len(lengths)))
    by_length = sorted(order, key=lambda i: -lengths[i])  # LengthGroupedSampler: longest first within a megabatch
    blocks = first_fit(lengths, BLOCK)
    packed = [[(i, lengths[i]) for i in b] + [(None, BLOCK - sum(lengths[i] for i in b))] for b in blocks]
    top, second = 590, 310
    panel(24, top, f"1 · Every example padded to {FIXED_LENGTH}", padded(order, FIXED_LENGTH),
          "(a fixed max length)")
    panel(570, top, "2 · Dynamic padding: each batch to its longest", padded(order, None),
          "(padding=True)")
    panel(24, second, "3 · Sorted by length, then dynamic padding", padded(by_length, None),
          "(group_by_length)")
    panel(570, second, f"4 · Packed into blocks of {BLOCK} (first fit)", packed, "")
    for i, line in enumerate(["Attention spans the whole block: without a",
                              "block-diagonal mask or a padding-free kernel",
                              "(position_ids per example), examples see each other."]):
        text(ax, 570, second - 126 - 21 * i, line, size=11, ha="left", color=MUTED)
    cell(ax, 24, 52, 22, 16, fc=EXAMPLE_COLOURS[0], ec="white")
    cell(ax, 46, 52, 22, 16, fc=EXAMPLE_COLOURS[1], ec="white")
    legend(fig, ax, 68, 60, [("tokens of an example, its number in the first cell", EXAMPLE_COLOURS[2], "white"),
                             ("padding (attention mask 0, label −100)", "#F2F2F2", "#B3B3B3")])
    return fig


# name -> drawing function; the names are the files img/<name>.png (tests/test_diagrams.py checks the folder)
DIAGRAMS = {
    "course_map": course_map,
    "lora": lora,
    "nf4": nf4,
    "double_quantization": double_quantization,
    "ptuning_prefix": ptuning_prefix,
    "zero_stages": zero_stages,
    "rlhf_dpo": rlhf_dpo,
    "padding_packing": padding_packing,
}


# ---------------------------------------------------------------------------------------------
# Writing and checking
# ---------------------------------------------------------------------------------------------

def draw(out: Path, names=None) -> list[Path]:
    """Draw the diagrams (all, or `names`) into `out`; return the written files."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with plt.rc_context():
        plt.rcdefaults()  # a reader's matplotlibrc must not change the bytes
        matplotlib.rcParams.update({"font.family": "DejaVu Sans", "font.size": 12, "svg.hashsalt": "course-img",
                                    "axes.unicode_minus": True})
        for name in names or DIAGRAMS:
            fig = DIAGRAMS[name]()
            path = out / f"{name}.png"
            fig.savefig(path, dpi=DPI, metadata={"Software": None, "Comment": DRAWN_WITH})
            plt.close(fig)
            written.append(path)
    return written


def drawn_with_of(path: Path) -> str | None:
    """The "Comment" a PNG was drawn with (DRAWN_WITH of the run that wrote it), or None."""
    from PIL import Image

    with Image.open(path) as image:
        return image.info.get("Comment")


def check(img_dir: Path | None = None) -> int:
    """Redraw into a temporary folder and compare byte for byte with the images in `img_dir` (default img/)."""
    img_dir = img_dir or IMG_DIR
    with tempfile.TemporaryDirectory() as tmp:
        for fresh in draw(Path(tmp)):
            committed = img_dir / fresh.name
            if not committed.exists():
                print(f"img/{fresh.name}: missing (run `python img/diagrams.py`)")
                return 1
            if not filecmp.cmp(committed, fresh, shallow=False):
                drawn_with = drawn_with_of(committed)
                versions = "" if drawn_with == DRAWN_WITH else f"; it was drawn by {drawn_with}, this is {DRAWN_WITH}"
                print(f"img/{fresh.name}: differs from what diagrams.py draws{versions} (run `python img/diagrams.py`)")
                return 1
    stray = sorted(p.name for p in img_dir.glob("*.png") if p.stem not in DIAGRAMS)
    if stray:
        print(f"img/{stray[0]}: not drawn by diagrams.py (add it to DIAGRAMS or delete it)")
        return 1
    print("img/ is up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="redraw into a temporary folder; exit 1 if an image in img/ differs")
    parser.add_argument("--out", type=Path, default=IMG_DIR, help="where to draw (default: img/)")
    args = parser.parse_args(argv)
    if args.check:
        return check()
    ours, theirs = nf4_values(), bitsandbytes_nf4()
    if theirs is not None:  # bitsandbytes stores its table in float32
        worst = max(abs(a - b) for a, b in zip(ours, theirs))
        assert len(theirs) == 16 and worst < 1e-6, f"NF4 values differ from bitsandbytes' by {worst}"
        print(f"NF4 values equal bitsandbytes' table (largest difference {worst:.1e}, float32 rounding)")
    for path in draw(args.out):
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
