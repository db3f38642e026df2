"""Self-contained HTML reports for audits and drift: inline SVG bars and base64 thumbnails, one file.

Nothing is fetched when the file is opened (no scripts, fonts or images from elsewhere): bars are inline SVG,
example images are PNG thumbnails embedded as ``data:`` URIs (decoded safely by ``t2c.data.images.load_image``;
an unreadable file becomes a grey placeholder).

Python API:
    audit_html(report, snapshot, thumbs=True) -> str
    drift_html(report, snapshot_a, snapshot_b, thumbs=True) -> str
    duplicates_html(report, thumbs=True) -> str
    write_html(path, html) -> Path    (atomic)
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

__all__ = ["audit_html", "drift_html", "duplicates_html", "write_html", "thumbnail_uri"]

THUMB = 96
BAR_W = 320

_PLACEHOLDER = ("data:image/svg+xml;base64," + base64.b64encode(
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{THUMB}" height="{THUMB}"><rect width="100%" height="100%" '
    f'fill="#ccc"/><text x="50%" y="55%" font-size="12" text-anchor="middle" fill="#666">unreadable</text></svg>'
    .encode()).decode())

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:17px;margin:22px 0 6px}table{border-collapse:collapse;width:100%}
td,th{padding:6px 8px;border-bottom:1px solid #eee;vertical-align:middle;text-align:left;font-size:13px}
th{background:#fafafa}.num{font-variant-numeric:tabular-nums;white-space:nowrap}.meta{color:#666;font-size:13px}
.thumbs img{width:56px;height:56px;object-fit:cover;margin:1px;border-radius:3px;border:1px solid #ddd}
.sig{color:#b00020;font-weight:600}.ns{color:#888}svg text{font-size:11px;fill:#444}
"""

_AUDIT_TMPL = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>t2c audit: {{ store|e }}</title><style>{{ css }}</style></head>
<body><h1>Concept audit</h1>
<p class="meta">store <b>{{ store|e }}</b> (snapshot {{ snapshot|e }}) &middot; {{ n }} images &middot;
encoder {{ encoder|e }} &middot; CLIP {{ clip|e }} &middot; prevalence method: {{ method|e }},
{{ (level*100)|round|int }}% intervals</p>
<table><tr><th>concept</th><th>prevalence (95% CI)</th><th></th><th>above threshold</th><th>top examples</th></tr>
{% for c in concepts %}<tr><td><b>{{ c.concept|e }}</b></td>
<td class="num">{{ "%.1f"|format(c.prevalence*100) }}% ({{ "%.1f"|format(c.ci_low*100) }}&ndash;{{ "%.1f"|format(c.ci_high*100) }})</td>
<td>{{ c.bar }}</td><td class="num">{{ c.count }} &middot; t={{ "%.3f"|format(c.threshold) }}</td>
<td class="thumbs">{% for t in c.thumbs %}<img src="{{ t.src }}" title="id {{ t.id }}" alt="id {{ t.id }}">{% endfor %}</td></tr>
{% endfor %}</table></body></html>"""

_DRIFT_TMPL = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>t2c drift</title><style>{{ css }}</style></head>
<body><h1>Concept drift</h1>
<p class="meta">A = <b>{{ store_a|e }}</b> ({{ n_a }} images) &middot; B = <b>{{ store_b|e }}</b> ({{ n_b }} images)
&middot; CLIP {{ clip|e }} &middot; two-proportion z-test at a pooled calibrated threshold,
{{ correction|e }}-corrected, &alpha; = {{ alpha }}; ranked by |Cohen's h|</p>
<table><tr><th>#</th><th>concept</th><th>A &rarr; B prevalence</th><th>shift</th><th>h</th><th>adj. p</th>
<th>examples A</th><th>examples B</th></tr>
{% for c in concepts %}<tr><td>{{ c.rank }}</td><td><b>{{ c.concept|e }}</b></td>
<td class="num">{{ "%.1f"|format(c.prevalence_a*100) }}% &rarr; {{ "%.1f"|format(c.prevalence_b*100) }}%</td>
<td>{{ c.bar }}</td><td class="num">{{ "%+.2f"|format(c.cohens_h) }}</td>
<td class="num {{ 'sig' if c.significant else 'ns' }}">{{ "%.2g"|format(c.p_adj) }}{{ ' *' if c.significant else '' }}</td>
<td class="thumbs">{% for t in c.thumbs_a %}<img src="{{ t.src }}" title="id {{ t.id }}" alt="id {{ t.id }}">{% endfor %}</td>
<td class="thumbs">{% for t in c.thumbs_b %}<img src="{{ t.src }}" title="id {{ t.id }}" alt="id {{ t.id }}">{% endfor %}</td></tr>
{% endfor %}</table></body></html>"""


_DUPS_TMPL = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>t2c duplicates: {{ store|e }}</title><style>{{ css }}
.group{display:flex;gap:10px;align-items:flex-start;padding:8px 0;border-bottom:1px solid #eee}
.group figure{margin:0;text-align:center;font-size:11px;color:#555;max-width:{{ thumb }}px;word-break:break-all}
.group img{width:{{ thumb }}px;height:{{ thumb }}px;object-fit:contain;border:1px solid #ddd;background:#fafafa}
</style></head>
<body><h1>Duplicate images</h1>
<p class="meta">store <b>{{ store|e }}</b> &middot; {{ n }} images &middot; {{ n_groups }} groups,
{{ n_duplicates }} duplicates &middot; candidate threshold {{ "%.4f"|format(threshold) }} ({{ method|e }}),
{{ candidate_pairs }} candidate pairs{% if verified %}, pixel check at correlation &ge; {{ match }}{% endif %}</p>
{% for g in groups %}<div class="group"><div class="num"><b>{{ loop.index }}</b><br>{{ g.kind }}<br>
&ge; {{ "%.3f"|format(g.min_similarity) }}</div>
{% for m in g.members %}<figure><img src="{{ m.src }}" alt="id {{ m.id }}"><figcaption>{{ m.id }}<br>{{ m.path|e }}
</figcaption></figure>{% endfor %}</div>
{% endfor %}</body></html>"""


def duplicates_html(report, thumbs: bool = True, max_members: int = 8) -> str:
    """HTML for a DuplicateReport (or its dict): each group's thumbnails side by side."""
    d = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    groups = []
    for g in d["groups"]:
        members = [{"id": i, "path": p, "src": thumbnail_uri(p) if thumbs else _PLACEHOLDER}
                   for i, p in list(zip(g["ids"], g["paths"]))[:max_members]]
        groups.append(dict(g, members=members))
    return _env().from_string(_DUPS_TMPL).render(
        css=_CSS, thumb=THUMB, store=d.get("store", ""), n=d["n"], n_groups=d["n_groups"],
        n_duplicates=d["n_duplicates"], threshold=d["threshold"], method=d["method"],
        candidate_pairs=d["candidate_pairs"], verified=d["verified"], match=d.get("match_correlation"),
        groups=groups)


def thumbnail_uri(path, size: int = THUMB) -> str:
    """A PNG thumbnail of an image file as a ``data:`` URI (placeholder when unreadable)."""
    from t2c.data.errors import T2CError
    from t2c.data.images import load_image

    try:
        img = load_image(path)
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    except (T2CError, OSError, ValueError):
        return _PLACEHOLDER


def _thumbs(snapshot, ids, enabled: bool) -> list[dict]:
    if not enabled or not ids:
        return []
    rows = snapshot.image_rows(ids)
    return [{"id": r["id"], "src": thumbnail_uri(r["path"])} for r in rows]


def _prevalence_bar(p: float, lo: float, hi: float, scale: float) -> str:
    def x(v):
        return 4 + (BAR_W - 8) * min(max(v / scale, 0.0), 1.0)

    return (f'<svg width="{BAR_W}" height="18" role="img" aria-label="{p*100:.1f}%">'
            f'<rect x="4" y="4" width="{BAR_W-8}" height="10" fill="#f0f0f0"/>'
            f'<rect x="4" y="4" width="{x(p)-4:.1f}" height="10" fill="#3b7dd8"/>'
            f'<line x1="{x(lo):.1f}" x2="{x(hi):.1f}" y1="9" y2="9" stroke="#111" stroke-width="1.5"/>'
            f'<line x1="{x(lo):.1f}" x2="{x(lo):.1f}" y1="5" y2="13" stroke="#111"/>'
            f'<line x1="{x(hi):.1f}" x2="{x(hi):.1f}" y1="5" y2="13" stroke="#111"/></svg>')


def _shift_bar(diff: float, scale: float, significant: bool) -> str:
    mid = BAR_W / 2
    w = (BAR_W / 2 - 4) * min(abs(diff) / scale, 1.0)
    x0 = mid if diff >= 0 else mid - w
    color = ("#c62828" if diff > 0 else "#2e7d32") if significant else "#bbb"
    return (f'<svg width="{BAR_W}" height="18" role="img" aria-label="{diff*100:+.1f} points">'
            f'<rect x="4" y="4" width="{BAR_W-8}" height="10" fill="#f6f6f6"/>'
            f'<rect x="{x0:.1f}" y="4" width="{w:.1f}" height="10" fill="{color}"/>'
            f'<line x1="{mid}" x2="{mid}" y1="1" y2="17" stroke="#333"/>'
            f'<text x="{BAR_W-6}" y="13" text-anchor="end">{diff*100:+.1f} pt</text></svg>')


def _env():
    import jinja2

    return jinja2.Environment(autoescape=False, undefined=jinja2.StrictUndefined)


def audit_html(report, snapshot, thumbs: bool = True, level: float = 0.95) -> str:
    """HTML for an AuditReport (or its dict): one row per concept with a CI bar and example thumbnails."""
    d = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    scale = max([c["ci_high"] for c in d["concepts"]] + [0.05])
    scale = min(1.0, scale * 1.1)
    rows = []
    for c in d["concepts"]:
        rows.append(dict(c, concept=c["concept"], bar=_prevalence_bar(c["prevalence"], c["ci_low"], c["ci_high"], scale),
                         thumbs=_thumbs(snapshot, c.get("examples", []), thumbs)))
    return _env().from_string(_AUDIT_TMPL).render(
        css=_CSS, store=d.get("store", ""), snapshot=d.get("snapshot", ""), n=d["n"], encoder=d.get("encoder", ""),
        clip=d.get("clip", ""), method=d.get("method", ""), level=level, concepts=rows)


def drift_html(report, snapshot_a, snapshot_b, thumbs: bool = True) -> str:
    """HTML for a DriftReport (or its dict): ranked concepts, shift bars, examples from both stores."""
    d = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    scale = max([abs(c["diff"]) for c in d["concepts"]] + [0.02])
    rows = []
    for c in d["concepts"]:
        rows.append(dict(c, bar=_shift_bar(c["diff"], scale, c["significant"]),
                         thumbs_a=_thumbs(snapshot_a, c.get("examples_a", []), thumbs),
                         thumbs_b=_thumbs(snapshot_b, c.get("examples_b", []), thumbs)))
    return _env().from_string(_DRIFT_TMPL).render(
        css=_CSS, store_a=d["store_a"], store_b=d["store_b"], n_a=d["n_a"], n_b=d["n_b"], clip=d.get("clip", ""),
        correction=d.get("correction", "bh"), alpha=d.get("alpha", 0.05), concepts=rows)


def write_html(path, html: str) -> Path:
    """Write an HTML file atomically."""
    from t2c.data.store import atomic_write_bytes

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, html.encode("utf-8"))
    return path
