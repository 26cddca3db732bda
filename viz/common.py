"""Shared look of every Graft figure: template, fonts, colours, titles, small formatting helpers.

Nothing here computes a result: helpers only format numbers that already sit in a result dict.
"""

from __future__ import annotations

import html
import math
import re
from typing import Any, Iterable, Optional, Sequence

import plotly.graph_objects as go
import plotly.io as pio

# ---------------------------------------------------------------------------------------------
# Colours (colour-blind friendly, from the Okabe-Ito / Tableau families)
# ---------------------------------------------------------------------------------------------
ATTENTION = "#4C72B0"  # attention modules (T7, T8)
MLP = "#DD8452"  # MLP modules
KIND_COLOURS = {"attention": ATTENTION, "mlp": MLP}

DONOR = "#8172B3"  # D
TARGET = "#55A868"  # T
TRANSPLANTED = "#C44E52"  # T'
MODEL_COLOURS = {"donor": DONOR, "target": TARGET, "transplanted": TRANSPLANTED}

GOOD = "#1a9850"  # verdict yes / fields equal (text)
BAD = "#d73027"  # verdict no / fields differ (text)
GOOD_FILL = "#e5f5e0"
BAD_FILL = "#fde0dd"
NEUTRAL_FILL = "#f7f7f7"
HEADER_FILL = "#e8ecf3"
GRID = "#e5e5e5"
MUTED = "#6b6b6b"

# Series colours for line charts with several residuals / baselines.
SERIES = ("#4C72B0", "#C44E52", "#55A868", "#8172B3", "#DD8452", "#937860", "#DA8BC3", "#8C8C8C")

# Continuous colour scales.
SIMILARITY_SCALE = "Viridis"  # CKA, cosines in [0, 1]: bright = similar
EPSILON_SCALE = "Blues"  # used reversed: small epsilon (good) = dark

CHECK = "✓"
CROSS = "✗"

FONT_FAMILY = "Inter, 'Segoe UI', 'Helvetica Neue', Arial, sans-serif"
BASE_FONT_SIZE = 13
TITLE_FONT_SIZE = 18
SUBTITLE_FONT_SIZE = 12

TEMPLATE_NAME = "graft"


def _build_template() -> go.layout.Template:
    t = go.layout.Template(pio.templates["plotly_white"])
    t.layout.font = dict(family=FONT_FAMILY, size=BASE_FONT_SIZE, color="#222222")
    t.layout.title = dict(x=0.0, xanchor="left", xref="paper", font=dict(size=TITLE_FONT_SIZE))
    t.layout.colorway = list(SERIES)
    t.layout.hoverlabel = dict(font=dict(family=FONT_FAMILY, size=12), bgcolor="white")
    t.layout.legend = dict(font=dict(size=12), bgcolor="rgba(255,255,255,0.85)")
    t.layout.xaxis = dict(gridcolor=GRID, zeroline=False, title=dict(font=dict(size=13)), automargin=True)
    t.layout.yaxis = dict(gridcolor=GRID, zeroline=False, title=dict(font=dict(size=13)), automargin=True)
    t.layout.margin = dict(l=70, r=30, t=100, b=60)
    return t


TEMPLATE = _build_template()
pio.templates[TEMPLATE_NAME] = TEMPLATE


# ---------------------------------------------------------------------------------------------
# Envelope access and titles
# ---------------------------------------------------------------------------------------------
def result_of(envelope: dict) -> dict:
    """The result dict of an envelope (or the envelope itself when given a bare result)."""
    if isinstance(envelope, dict) and isinstance(envelope.get("result"), dict):
        return envelope["result"]
    return envelope if isinstance(envelope, dict) else {}


def display_name(ref: Any, default: str) -> str:
    """A model reference as shown in titles: local paths by their last component, hub ids and
    built-in names unchanged, escaped for Plotly's HTML-like text."""
    text = str(ref or "").strip()
    if not text:
        return default
    if text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1:
        text = re.split(r"[\\/]", text.rstrip("/\\"))[-1] or text
    # Plotly reads tags (<b>, <a href>, <span style>) and entities in titles and labels: a folder
    # name is shown as written, never as markup.
    return html.escape(text, quote=False)


def model_names(envelope: dict) -> tuple[str, str]:
    e = envelope if isinstance(envelope, dict) else {}
    return display_name(e.get("donor"), "donor"), display_name(e.get("target"), "target")


def tool_code(envelope: dict, default: str) -> str:
    meta = envelope.get("meta") if isinstance(envelope, dict) else None
    code = meta.get("code") if isinstance(meta, dict) else None
    return str(code or default)


def figure_title(code: str, title: str, donor: str, target: str) -> str:
    """E.g. ``T2 Layer similarity — donor X vs target Y``."""
    return f"{code} {title} — donor {donor} vs target {target}"


def envelope_title(envelope: dict, default_code: str, title: str) -> str:
    d, t = model_names(envelope)
    return figure_title(tool_code(envelope, default_code), title, d, t)


def slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.")
    return s or "figure"


def download_filename(envelope: dict, default_code: str, tool: str) -> str:
    """A file-name stem for exported images/HTML, e.g. ``graft_T2_cka_tiny-gpt2-a_vs_tiny-llama-b``."""
    d, t = (html.unescape(n) for n in model_names(envelope))
    return slug(f"graft_{tool_code(envelope, default_code)}_{tool}_{d}_vs_{t}")


def apply_layout(
    fig: go.Figure,
    title: str,
    subtitle: str = "",
    *,
    height: Optional[int] = None,
    filename: str = "",
    **layout: Any,
) -> go.Figure:
    """Template, title (with a smaller subtitle line) and the export file name in ``layout.meta``."""
    title_dict: dict[str, Any] = dict(text=title)
    if subtitle:
        title_dict["subtitle"] = dict(text=subtitle, font=dict(size=SUBTITLE_FONT_SIZE, color=MUTED))
    fig.update_layout(template=TEMPLATE_NAME, title=title_dict, **layout)
    if height:
        fig.update_layout(height=height)
    if filename:
        fig.update_layout(meta={"graft_filename": filename})
    return fig


def note(fig: go.Figure, text: str, *, y: float = -0.12) -> None:
    """A small grey line of text under the plot area (paper coordinates)."""
    fig.add_annotation(
        text=text,
        xref="paper",
        yref="paper",
        x=0,
        y=y,
        xanchor="left",
        yanchor="top",
        showarrow=False,
        font=dict(size=11, color=MUTED),
        align="left",
    )


# ---------------------------------------------------------------------------------------------
# Formatting (no statistics)
# ---------------------------------------------------------------------------------------------
def is_number(v: Any) -> bool:
    return (
        isinstance(v, (int, float))
        and not isinstance(v, bool)
        and not (isinstance(v, float) and math.isnan(v))
    )


def fmt_num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.{digits}f}"
    return str(v)


def fmt_value(v: Any) -> str:
    """Display form of an architecture field value."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return fmt_num(v, 4)
    if isinstance(v, dict):
        return ", ".join(f"{k}: {fmt_value(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return (
            "×".join(str(x) for x in v)
            if all(isinstance(x, int) for x in v)
            else ", ".join(map(fmt_value, v))
        )
    return str(v)


def layer_label(layer: Any) -> str:
    """Layer index as shown on axes: ``-1`` is the embedding stream h_{-1}."""
    return "emb" if layer == -1 else str(layer)


def layer_hover(layer: Any) -> str:
    return "−1 (embeddings)" if layer == -1 else str(layer)


def int_axis(values: Sequence[Any], labeller=layer_label) -> dict:
    """Axis settings that show one tick per integer position (and 'emb' for -1)."""
    vals = list(values)
    if not vals:
        return {}
    # Thin the ticks on deep models so labels stay readable.
    step = max(1, -(-len(vals) // 24))
    shown = vals[::step]
    return dict(tickmode="array", tickvals=shown, ticktext=[labeller(v) for v in shown])


def matrix_shape(m: Any) -> tuple[int, int]:
    if not m:
        return 0, 0
    return len(m), max((len(r) for r in m), default=0)


def cell_text_ok(rows: int, cols: int, limit: int = 14) -> bool:
    """Write values into heatmap cells only when the grid is small enough to read them."""
    return 0 < rows <= limit and 0 < cols <= limit


def nonnull(values: Iterable[Any]) -> list[Any]:
    return [v for v in values if v is not None]
