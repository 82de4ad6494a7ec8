"""The report page's inline stylesheet and script (vanilla JS, no dependencies).

Kept as Python strings so the package needs no data files. The script reads the JSON in
`#cscope-data` (and image URLs in `#cscope-assets`), renders only the current view, and
puts every data string into the page with `textContent` / `setAttribute` — never as
markup — so a concept named `<img src=x onerror=alert(1)>` is shown as text.
"""

PAGE_CSS = r"""
:root { --target: #2166ac; --context: #8c8c8c; --bias: #d6301d; --ink: #1d232b; --muted: #5f6b78;
  --line: #dfe3e8; --bg: #f5f7fa; --card: #fff; --accent: #0b6e99; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  color: var(--ink); background: var(--bg); }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
header#top { position: sticky; top: 0; z-index: 10; display: flex; align-items: center; gap: 18px;
  padding: 10px 24px; background: #17212b; color: #fff; box-shadow: 0 1px 4px rgba(0,0,0,.2); }
header#top .brand { font-weight: 650; font-size: 16px; color: #fff; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; max-width: 40%; }
header#top nav a { color: #cfe3f1; margin-right: 12px; }
.search { position: relative; margin-left: auto; width: 360px; }
.search input { width: 100%; padding: 7px 10px; border-radius: 6px; border: 1px solid #3b4a58;
  background: #223140; color: #fff; font-size: 14px; }
.search input::placeholder { color: #9fb0c0; }
.results { position: absolute; right: 0; left: 0; top: 38px; background: var(--card); color: var(--ink);
  border: 1px solid var(--line); border-radius: 6px; box-shadow: 0 6px 18px rgba(0,0,0,.18); max-height: 420px;
  overflow: auto; display: none; }
.results.open { display: block; }
.results a { display: flex; gap: 8px; align-items: baseline; padding: 6px 10px; color: var(--ink); }
.results a:hover, .results a.active { background: #eaf3f8; text-decoration: none; }
.results .kind { font-size: 11px; text-transform: uppercase; color: var(--muted); width: 56px; flex: none; }
.results .empty { padding: 8px 10px; color: var(--muted); }
main { padding: 20px 24px 40px; max-width: 1500px; margin: 0 auto; }
h1 { font-size: 22px; margin: 4px 0 2px; overflow-wrap: anywhere; }
h2 { font-size: 16px; margin: 0 0 10px; }
.sub { color: var(--muted); margin-bottom: 14px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px; margin-bottom: 16px; }
.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 10px; }
.fact { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
.fact .k { font-size: 11px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
.fact .v { font-size: 15px; font-weight: 600; overflow-wrap: anywhere; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: middle; }
th { font-size: 12px; color: var(--muted); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.badge { display: inline-block; font-size: 11px; font-weight: 600; padding: 1px 7px; border-radius: 9px; color: #fff;
  margin-right: 4px; vertical-align: 1px; }
.badge.target { background: var(--target); } .badge.context { background: var(--context); }
.badge.bias { background: var(--bias); } .badge.uncertain { background: #e0a100; } .badge.entangled { background: #7b3294; } .badge.plain { background: #e7ecf1; color: var(--ink); }
.split { display: grid; grid-template-columns: minmax(420px, 600px) 1fr; gap: 16px; align-items: start; }
@media (max-width: 1000px) { .split { grid-template-columns: 1fr; } }
svg.scatter { width: 100%; height: auto; display: block; }
svg.scatter .axis { stroke: #9aa5b1; stroke-width: 1; }
svg.scatter .grid { stroke: #eef1f4; stroke-width: 1; }
svg.scatter text { font-size: 11px; fill: var(--muted); }
svg.scatter circle { stroke: #fff; stroke-width: 1.5; cursor: pointer; }
svg.scatter circle.hot { stroke: #111; stroke-width: 2.5; }
.legend { display: flex; gap: 14px; flex-wrap: wrap; font-size: 12px; color: var(--muted); margin-top: 6px; }
.legend i { display: inline-block; width: 10px; height: 10px; border-radius: 50%; margin-right: 5px; vertical-align: -1px; }
.legend i.line { border-radius: 0; height: 0; width: 16px; border-top: 2px dashed; vertical-align: 3px; }
.picked { min-height: 120px; }
.picked .none { color: var(--muted); }
.clist { list-style: none; margin: 0; padding: 0; }
.clist li { display: flex; gap: 10px; align-items: center; padding: 6px 4px; border-bottom: 1px solid var(--line); }
.clist li:hover { background: #f3f8fb; }
.clist .meta { min-width: 0; flex: 1; }
.clist .name { font-weight: 600; overflow-wrap: anywhere; }
.clist .scores { font-size: 12px; color: var(--muted); font-variant-numeric: tabular-nums; }
.empty-note { color: var(--muted); font-style: italic; }
img.tile { height: 40px; width: auto; border-radius: 3px; background: #222; flex: none; max-width: 240px; object-fit: cover;
  object-position: left; }
img.tile-big { height: 96px; width: auto; max-width: 100%; border-radius: 4px; background: #222; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 112px; }
figure img { width: 112px; height: 112px; object-fit: cover; border-radius: 4px; background: #ddd; display: block; }
figcaption { font-size: 11px; color: var(--muted); overflow-wrap: anywhere; line-height: 1.3; margin-top: 3px; }
.bar { height: 8px; background: #e8edf2; border-radius: 4px; min-width: 80px; }
.bar > span { display: block; height: 8px; border-radius: 4px; background: var(--accent); }
.row-flex { display: flex; gap: 16px; flex-wrap: wrap; align-items: flex-start; }
.pager { display: flex; gap: 12px; margin: 0 0 8px; }
button, select { font: inherit; padding: 4px 10px; border: 1px solid var(--line); border-radius: 6px; background: #fff; cursor: pointer; }
#class-examples .sub { margin: 10px 0 6px; }
.notes { color: #8a5a00; background: #fff7e6; border: 1px solid #f3dfb4; border-radius: 6px; padding: 6px 10px; margin-bottom: 12px; }
footer { color: var(--muted); font-size: 12px; margin-top: 24px; }
"""

PAGE_JS = r"""
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("cscope-data").textContent);
  var ASSETS = JSON.parse(document.getElementById("cscope-assets").textContent);
  var META = DATA.meta, CLASSES = DATA.classes, CONCEPTS = DATA.concepts, EXAMPLES = DATA.examples || {};
  var TYPES = ["target", "context", "bias", "uncertain", "entangled"];
  var COLORS = ["#2166ac", "#8c8c8c", "#d6301d", "#e0a100", "#7b3294"];
  // row layout of a class's candidate: see report.py
  var LAT = 0, TYPE = 1, A = 2, NA = 3, SUF = 4, NEC = 5, STR = 6, CF = 7, FREQ = 8;
  var EFF = 9, ELO = 10, EHI = 11, Q = 12, PC = 13, PR = 14, RF = 15, ET = 16, CO = 17, COLO = 18, COHI = 19;
  // The context-only check (object boxes): claims it moved out of bias are "entangled".
  var CHECK = META.context_check || null;
  // Under the evidence rule the class scatter's y axis is the effect (Cliff's delta, class vs rest,
  // bounded in [-1, 1]) and the bias line is min_effect; under the reference rule, the strength.
  var EVIDENCE = META.bias_rule === "evidence";
  var YV = EVIDENCE ? EFF : STR;
  var Y_LABEL = EVIDENCE ? "effect: Cliff\u2019s \u03b4, class vs rest" : (META.strength_label || "concept strength");
  function qfmt(q) { return q === null || q === undefined ? "\u2013" : (q < 1e-3 ? q.toExponential(1) : fmt(q, 3)); }
  function effectText(r) {
    if (r[EFF] === null || r[EFF] === undefined) return "\u2013";
    return fmt(r[EFF], 2) + " [" + fmt(r[ELO], 2) + ", " + fmt(r[EHI], 2) + "]";
  }
  function hasContextOnly(r) { return r[CO] !== null && r[CO] !== undefined; }
  function contextOnlyText(r) {
    return hasContextOnly(r) ? fmt(r[CO], 2) + " [" + fmt(r[COLO], 2) + ", " + fmt(r[COHI], 2) + "]" : "\u2013";
  }
  var SVG_NS = "http://www.w3.org/2000/svg";
  var byId = new Map();
  CLASSES.forEach(function (c, i) { c.index = i; byId.set(c.id, c); });
  var main = document.getElementById("main");

  function has(obj, key) { return Object.prototype.hasOwnProperty.call(obj, key); }

  // Build an element. Data only ever becomes text nodes or attribute values, never markup.
  function el(tag, props) {
    var node = document.createElement(tag);
    setProps(node, props);
    for (var i = 2; i < arguments.length; i++) add(node, arguments[i]);
    return node;
  }
  function svg(tag, props) {
    var node = document.createElementNS(SVG_NS, tag);
    setProps(node, props);
    for (var i = 2; i < arguments.length; i++) add(node, arguments[i]);
    return node;
  }
  function setProps(node, props) {
    if (!props) return;
    Object.keys(props).forEach(function (k) {
      var v = props[k];
      if (v === null || v === undefined) return;
      if (k === "text") node.textContent = String(v);
      else if (k === "cls") node.setAttribute("class", v);
      else if (k === "on") Object.keys(v).forEach(function (ev) { node.addEventListener(ev, v[ev]); });
      else node.setAttribute(k, String(v));
    });
  }
  function add(node, child) {
    if (child === null || child === undefined || child === false) return;
    if (Array.isArray(child)) { child.forEach(function (c) { add(node, c); }); return; }
    node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
  }
  function img(asset, alt, cls) {
    var node = el("img", {cls: cls, alt: alt || "", loading: "lazy", decoding: "async"});
    if (asset && has(ASSETS, asset)) node.src = ASSETS[asset];
    return node;
  }
  function fmt(x, digits) {
    if (x === null || x === undefined || !isFinite(x)) return "\u2013";
    var d = digits === undefined ? 3 : digits;
    var a = Math.abs(x);
    if (a !== 0 && (a < 0.001 || a >= 1e5)) return Number(x).toExponential(2);
    return Number(x).toFixed(d);
  }
  function pct(x) { return x === null || x === undefined ? "\u2013" : (100 * x).toFixed(1) + "%"; }
  function conceptName(k) {
    var c = CONCEPTS[String(k)];
    return c && c.name ? c.name : "unnamed latent";
  }
  function conceptLink(k, y) {
    return el("a", {href: "#concept/" + k + (y === null || y === undefined ? "" : "/" + y), cls: "concept-link",
                    text: conceptName(k)});
  }
  function classLink(y) {
    var c = byId.get(y);
    return el("a", {href: "#class/" + y, cls: "class-link", text: c ? c.name : (META.class_names[y] || String(y))});
  }
  function className(y) { var c = byId.get(y); return c ? c.name : (META.class_names[y] || String(y)); }
  function badge(type) { return el("span", {cls: "badge " + TYPES[type], text: TYPES[type]}); }
  function fact(k, v) { return el("div", {cls: "fact"}, el("div", {cls: "k", text: k}), el("div", {cls: "v", text: v})); }
  function tileOf(k, cls) {
    var c = CONCEPTS[String(k)];
    return c && c.tile ? img(c.tile, "reference images of latent " + k, cls || "tile") : null;
  }

  // ------------------------------------------------------------------ header and search
  var searchIndex = [];
  CLASSES.forEach(function (c) { searchIndex.push({kind: "class", key: String(c.name).toLowerCase(), label: c.name,
                                                   href: "#class/" + c.id, extra: "class " + c.id}); });
  Object.keys(CONCEPTS).forEach(function (k) {
    var name = CONCEPTS[k].name || "";
    searchIndex.push({kind: "concept", key: (name + " #" + k).toLowerCase(), label: name || "unnamed latent",
                      href: "#concept/" + k, extra: "#" + k});
  });

  function buildHeader() {
    var top = document.getElementById("top");
    var input = el("input", {type: "search", id: "search", placeholder: "Search classes and concepts\u2026",
                             "aria-label": "search classes and concepts", autocomplete: "off"});
    var results = el("div", {cls: "results", id: "search-results", role: "listbox"});
    top.replaceChildren(
      el("a", {cls: "brand", href: "#overview", text: META.title || "cscope report"}),
      el("nav", null, el("a", {href: "#overview", text: "Overview"}),
         CLASSES.length ? el("a", {href: "#class/" + CLASSES[0].id, text: "Classes"}) : null),
      el("div", {cls: "search"}, input, results));
    function run() {
      var q = input.value.trim().toLowerCase();
      results.replaceChildren();
      if (!q) { results.classList.remove("open"); return; }
      var hits = { "class": [], "concept": [] };
      for (var i = 0; i < searchIndex.length; i++) {
        var e = searchIndex[i];
        if (hits[e.kind].length < 15 && e.key.indexOf(q) !== -1) hits[e.kind].push(e);
      }
      var all = hits["class"].concat(hits["concept"]);
      if (!all.length) results.appendChild(el("div", {cls: "empty", text: "No match"}));
      all.forEach(function (e, i) {
        results.appendChild(el("a", {href: e.href, cls: i === 0 ? "active" : null, role: "option"},
          el("span", {cls: "kind", text: e.kind}), el("span", {text: e.label}), el("span", {cls: "kind", text: e.extra})));
      });
      results.classList.add("open");
    }
    input.addEventListener("input", run);
    input.addEventListener("focus", run);
    input.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter") { var first = results.querySelector("a"); if (first) location.hash = first.getAttribute("href"); }
      if (ev.key === "Escape") { input.value = ""; run(); }
    });
    document.addEventListener("click", function (ev) { if (!top.contains(ev.target)) results.classList.remove("open"); });
    window.addEventListener("hashchange", function () { results.classList.remove("open"); input.blur(); });
  }

  // ------------------------------------------------------------------ overview
  function classSummary(c) {
    var nb = 0, nt = 0, nc = 0, ne = 0, strongest = null;
    function key(r) { return EVIDENCE ? (r[ELO] === null ? -2 : r[ELO]) : r[STR]; }
    c.rows.forEach(function (r) {
      if (r[TYPE] === 2) { nb++; if (strongest === null || key(r) > key(strongest)) strongest = r; }
      else if (r[TYPE] === 0) nt++; else if (r[TYPE] === 4) ne++; else nc++;
    });
    return {c: c, nb: nb, nt: nt, nc: nc, ne: ne, strongest: strongest};
  }

  function renderOverview() {
    var sae = META.sae || {};
    var saeText = (sae.architecture || "?") + (sae.k ? " (k=" + sae.k + ")" : "") + ", " + (sae.d_sae || "?") + " latents";
    main.appendChild(el("h1", {text: META.title || "cscope report"}));
    main.appendChild(el("div", {cls: "sub", text: "Dataset bias report: concepts of a sparse autoencoder on " +
      (META.backbone || "a CLIP model") + ", per class split into target, context and bias."}));
    main.appendChild(el("div", {cls: "facts card", id: "overview-facts"},
      fact("Dataset", META.dataset), fact("Split", META.split), fact("Images", META.n_images),
      fact("Classes", META.n_classes), fact("Concepts shown", META.n_concepts), fact("Backbone", META.backbone || "\u2013"),
      fact("Layer", META.layer_index !== undefined && META.layer_index !== null ? META.layer_index + " (" + META.layer + ")" : META.layer),
      fact("SAE", saeText), fact("SAE d_in", sae.d_in), fact("FVU", fmt(sae.fvu)), fact("L0", fmt(sae.l0, 1)),
      fact("Dead latents", sae.dead_fraction === undefined || sae.dead_fraction === null ? "\u2013" : pct(sae.dead_fraction))));

    var summaries = CLASSES.map(classSummary);
    var card = el("div", {cls: "card"});
    var sort = el("select", {id: "rank-by", "aria-label": "rank classes by"},
      el("option", {value: "evidence", text: "strength of evidence"}),
      el("option", {value: "count", text: "most bias concepts"}), el("option", {value: "strength", text: "strongest bias concept"}));
    var limit = 100;
    var body = el("tbody");
    var more = el("button", {type: "button", id: "show-all"});
    function strength(s) { return s.strongest ? s.strongest[YV] : -1; }
    function fill() {
      var by = sort.value;
      summaries.sort(function (a, b) {
        if (by === "evidence") return ((a.c.rank || 1e9) - (b.c.rank || 1e9)) || (a.c.index - b.c.index);
        if (by === "count") return (b.nb - a.nb) || (strength(b) - strength(a)) || (a.c.index - b.c.index);
        return (strength(b) - strength(a)) || (b.nb - a.nb) || (a.c.index - b.c.index);
      });
      body.replaceChildren();
      summaries.slice(0, limit).forEach(function (s, i) {
        var st = s.strongest;
        body.appendChild(el("tr", null,
          el("td", {cls: "num", text: i + 1}), el("td", null, classLink(s.c.id)),
          el("td", {cls: "num", text: s.nb}),
          el("td", null, st ? conceptLink(st[LAT], s.c.id) :
             el("span", {cls: "empty-note", text: s.c.status || "none"})),
          el("td", {cls: "num", text: st ? (EVIDENCE ? effectText(st) : fmt(st[STR])) : "\u2013"}),
          el("td", {cls: "num", text: st && EVIDENCE ? qfmt(st[Q]) : "\u2013"}),
          el("td", {cls: "num", text: s.nt}), CHECK ? el("td", {cls: "num", text: s.ne}) : null, el("td", {cls: "num", text: s.nc}),
          el("td", {cls: "num", text: s.c.n === null || s.c.n === undefined ? "\u2013" : s.c.n})));
      });
      more.textContent = "Show all " + summaries.length + " classes";
      more.style.display = summaries.length > limit ? "" : "none";
    }
    sort.addEventListener("change", fill);
    more.addEventListener("click", function () { limit = summaries.length; fill(); });
    card.appendChild(el("h2", {text: "Classes ranked by evidence of bias"}));
    if (EVIDENCE) card.appendChild(el("div", {cls: "sub", text: "A bias is a context concept over-represented in the class " +
      "versus the rest of the split: one-sided Mann\u2013Whitney test, Benjamini\u2013Hochberg q \u2264 " + fmt(META.fdr, 2) +
      " over every (class, concept) tested, and effect (Cliff\u2019s \u03b4) \u2265 " + fmt(META.min_effect, 3) +
      ". Classes are ranked by the lower CI bound of their strongest bias."}));
    if (CHECK) card.appendChild(el("div", {cls: "sub", id: "context-check-note", text: "Context-only check (object boxes from " +
      CHECK.column + "): every claim was measured again on " + CHECK.n_images + " sampled images with the object\u2019s patches " +
      "dropped; " + CHECK.n_entangled + " of " + CHECK.n_claims + " whole-image claims were not over-represented without the " +
      "object and are listed as entangled, not as bias."}));
    card.appendChild(el("div", {cls: "pager"}, el("label", {"for": "rank-by", text: "Rank by "}), sort));
    card.appendChild(el("table", {id: "class-ranking"},
      el("thead", null, el("tr", null, el("th", {cls: "num", text: "#"}), el("th", {text: "class"}),
        el("th", {cls: "num", text: "bias concepts"}), el("th", {text: "strongest bias concept"}),
        el("th", {cls: "num", text: EVIDENCE ? "its effect [95% CI]" : "its strength"}), el("th", {cls: "num", text: "q"}),
        el("th", {cls: "num", text: "target"}), CHECK ? el("th", {cls: "num", text: "entangled"}) : null,
        el("th", {cls: "num", text: "context (not bias)"}), el("th", {cls: "num", text: "images"}))),
      body));
    card.appendChild(more);
    fill();
    main.appendChild(card);
    if (DATA.act) main.appendChild(renderAct(DATA.act));
  }

  // Bias groups (`cscope groups`) and model checks (`cscope check-model`), when they were run.
  function renderAct(act) {
    var card = el("div", {cls: "card", id: "act"});
    card.appendChild(el("h2", {text: "Bias groups and model checks"}));
    function cell(x, digits) { return el("td", {cls: "num", text: x === null || x === undefined ? "\u2013" : fmt(x, digits)}); }
    function head(names) { return el("thead", null, el("tr", null, names.map(function (n, i) {
      return el("th", i ? {cls: "num", text: n} : {text: n}); }))); }
    (act.groups || []).forEach(function (g) {
      card.appendChild(el("h3", {text: "Groups of " + g.split + " (" + g.n_images + " images; claims from " + g.claims_split + ")"}));
      card.appendChild(el("div", {cls: "sub", text: g.rule || ""}));
      card.appendChild(el("table", {cls: "act-groups"}, head(["bias claim", "threshold", "J", "y\u2227c aligned",
        "y\u2227\u00acc conflicting", "other\u2227c", "other\u2227\u00acc"]),
        el("tbody", null, g.claims.map(function (c) {
          return el("tr", null, el("td", {text: c.claim}), cell(c.threshold), cell(c.j, 2), cell(c.aligned, 0),
            cell(c.conflicting, 0), cell(c.other_with, 0), cell(c.other_without, 0)); }))));
    });
    (act.checks || []).forEach(function (m) {
      var worst = m.worst_group || {};
      card.appendChild(el("h3", {text: "Model check: " + m.model + " on " + m.split + " \u2014 accuracy " + fmt(m.accuracy) +
        ", worst group " + fmt(worst.accuracy) + " (" + (worst.group || "\u2013") + ", n=" + worst.n + ")"}));
      card.appendChild(el("div", {cls: "sub", text: (m.description || "") + "; intervals are simultaneous at level " + fmt(m.level, 4)}));
      card.appendChild(el("table", {cls: "act-check"}, head(["bias claim", "acc aligned", "n", "acc conflicting", "n",
        "gap", "CI low", "CI high", "verdict"]),
        el("tbody", null, m.biases.map(function (b) {
          return el("tr", null, el("td", {text: b.claim}), cell(b.accuracy_aligned), cell(b.n_aligned, 0),
            cell(b.accuracy_conflicting), cell(b.n_conflicting, 0), cell(b.gap), cell(b.low), cell(b.high),
            el("td", {text: b.verdict})); }))));
    });
    return card;
  }

  // ------------------------------------------------------------------ class view
  function ticks(lo, hi, n) {
    var span = hi - lo || 1, step = Math.pow(10, Math.floor(Math.log10(span / n)));
    var err = span / n / step;
    if (err >= 7.5) step *= 10; else if (err >= 3.5) step *= 5; else if (err >= 1.5) step *= 2;
    var out = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
    return out;
  }

  function scatter(c, onPick) {
    var W = 580, H = 420, ml = 58, mr = 18, mt = 14, mb = 46;
    var pts = c.rows.filter(function (r) { return r[NA] !== null && r[YV] !== null && r[YV] !== undefined; });
    var xs = pts.map(function (r) { return r[NA]; }), ys = pts.map(function (r) { return r[YV]; });
    var bt = EVIDENCE ? META.min_effect : c.bt;
    if (c.tt !== null && c.tt !== undefined) xs.push(c.tt);
    if (bt !== null && bt !== undefined) ys.push(bt);
    var x0 = Math.min.apply(null, xs.concat([0])), x1 = Math.max.apply(null, xs.concat([1]));
    // Strengths are >= 0 except effect sizes, which can be negative: the y axis starts at 0 or below.
    var y0 = Math.min.apply(null, ys.concat([0])), y1 = Math.max.apply(null, ys.concat([1e-6]));
    var px = (x1 - x0) * 0.06, py = (y1 - y0) * 0.08; x0 -= px; x1 += px; y1 += py; if (y0 < 0) y0 -= py;
    function X(v) { return ml + (v - x0) / (x1 - x0) * (W - ml - mr); }
    function Y(v) { return H - mb - (v - y0) / (y1 - y0) * (H - mt - mb); }
    var root = svg("svg", {cls: "scatter", id: "scatter", viewBox: "0 0 " + W + " " + H, role: "img",
                           "aria-label": "alignment versus concept strength"});
    ticks(x0, x1, 6).forEach(function (t) {
      root.appendChild(svg("line", {cls: "grid", x1: X(t), x2: X(t), y1: mt, y2: H - mb}));
      root.appendChild(svg("text", {x: X(t), y: H - mb + 16, "text-anchor": "middle", text: fmt(t, 2)}));
    });
    ticks(y0, y1, 5).forEach(function (t) {
      root.appendChild(svg("line", {cls: "grid", x1: ml, x2: W - mr, y1: Y(t), y2: Y(t)}));
      root.appendChild(svg("text", {x: ml - 6, y: Y(t) + 4, "text-anchor": "end", text: fmt(t, 2)}));
    });
    root.appendChild(svg("line", {cls: "axis", x1: ml, x2: W - mr, y1: H - mb, y2: H - mb}));
    root.appendChild(svg("line", {cls: "axis", x1: ml, x2: ml, y1: mt, y2: H - mb}));
    root.appendChild(svg("text", {x: (ml + W - mr) / 2, y: H - 8, "text-anchor": "middle", text: "normalised alignment score"}));
    root.appendChild(svg("text", {x: 14, y: (mt + H - mb) / 2, "text-anchor": "middle",
                                  transform: "rotate(-90 14 " + (mt + H - mb) / 2 + ")", text: Y_LABEL}));
    if (c.tt !== null && c.tt !== undefined) {
      root.appendChild(svg("line", {id: "target-threshold", x1: X(c.tt), x2: X(c.tt), y1: mt, y2: H - mb,
                                    stroke: COLORS[0], "stroke-dasharray": "6 4", "stroke-width": 1.5}));
      root.appendChild(svg("text", {x: X(c.tt) + 4, y: H - mb - 6, text: "target threshold " + fmt(c.tt, 2), fill: COLORS[0]}));
    }
    if (bt !== null && bt !== undefined) {
      root.appendChild(svg("line", {id: "bias-threshold", x1: ml, x2: W - mr, y1: Y(bt), y2: Y(bt),
                                    stroke: COLORS[2], "stroke-dasharray": "6 4", "stroke-width": 1.5}));
      root.appendChild(svg("text", {x: W - mr - 4, y: Y(bt) - 5, "text-anchor": "end",
                                    text: (EVIDENCE ? "min effect " : "bias threshold ") + fmt(bt, 3), fill: COLORS[2]}));
    }
    var circles = {};
    [3, 1, 4, 0, 2].forEach(function (type) {  // bias drawn last, on top
      pts.filter(function (r) { return r[TYPE] === type; }).forEach(function (r) {
        if (EVIDENCE && r[ELO] !== null && r[ELO] !== undefined) {  // the effect's CI as a vertical bar
          root.appendChild(svg("line", {cls: "ci", x1: X(r[NA]), x2: X(r[NA]), y1: Y(r[ELO]), y2: Y(r[EHI]),
                                        stroke: COLORS[type], "stroke-width": 1.5, opacity: 0.6}));
        }
        var dot = svg("circle", {cx: X(r[NA]), cy: Y(r[YV]), r: 6.5, fill: COLORS[type], "data-latent": r[LAT],
                                 tabindex: 0, on: {mouseenter: function () { onPick(r, false); },
                                                   click: function () { onPick(r, true); },
                                                   focus: function () { onPick(r, true); },
                                                   dblclick: function () { location.hash = "#concept/" + r[LAT] + "/" + c.id; }}},
                      svg("title", {text: conceptName(r[LAT]) + " (#" + r[LAT] + ", " + TYPES[type] + ")"}));
        circles[r[LAT]] = dot;
        root.appendChild(dot);
      });
    });
    return {node: root, circles: circles};
  }

  function scoreLine(r) {
    var head = "A\u2032 " + fmt(r[NA], 2) + " \u00b7 A " + fmt(r[A]);
    if (EVIDENCE && r[EFF] !== null && r[EFF] !== undefined) {
      return head + " \u00b7 effect " + effectText(r) + (r[ET] !== null && r[ET] !== undefined ? " \u00b7 typical " + fmt(r[ET], 2) : "") +
             " \u00b7 q " + qfmt(r[Q]) + " \u00b7 present in " + pct(r[PC]) + " of the class vs " + pct(r[PR]) + " of the rest" +
             (hasContextOnly(r) ? " \u00b7 without the object " + contextOnlyText(r) : "");
    }
    return head + " \u00b7 strength " + fmt(r[STR]) + " \u00b7 in " + pct(r[CF]) + " of the class";
  }

  function renderClass(c) {
    var prev = CLASSES[(c.index - 1 + CLASSES.length) % CLASSES.length], next = CLASSES[(c.index + 1) % CLASSES.length];
    main.appendChild(el("div", {cls: "pager"}, el("a", {href: "#overview", text: "\u2190 overview"}),
      el("a", {href: "#class/" + prev.id, text: "\u2039 " + prev.name}), el("a", {href: "#class/" + next.id, text: next.name + " \u203a"})));
    main.appendChild(el("h1", {id: "class-title", text: c.name}));
    main.appendChild(el("div", {cls: "sub", text: "class " + c.id + " \u00b7 " + (c.n === null || c.n === undefined ? "?" : c.n) +
      " images \u00b7 " + c.rows.length + " candidate concepts"}));
    if (c.notes && c.notes.length) main.appendChild(el("div", {cls: "notes", text: c.notes.join("; ")}));

    var picked = el("div", {cls: "card picked", id: "picked"}, el("div", {cls: "none", text: "Hover or click a point to see its concept."}));
    var plot = null;
    var hot = null;
    function pick(r) {
      if (hot) hot.classList.remove("hot");
      hot = plot && plot.circles[r[LAT]];
      if (hot) hot.classList.add("hot");
      var k = r[LAT];
      picked.replaceChildren(
        el("h2", null, badge(r[TYPE]), conceptLink(k, c.id), el("span", {cls: "kind", text: "  #" + k})),
        tileOf(k, "tile-big"),
        el("table", null, el("tbody", null,
          el("tr", null, el("th", {text: "normalised alignment"}), el("td", {cls: "num", text: fmt(r[NA])}),
             el("th", {text: "alignment"}), el("td", {cls: "num", text: fmt(r[A])})),
          el("tr", null, el("th", {text: "sufficiency"}), el("td", {cls: "num", text: fmt(r[SUF])}),
             el("th", {text: "necessity"}), el("td", {cls: "num", text: fmt(r[NEC])})),
          el("tr", null, el("th", {text: DATA.meta.strength_label || "concept strength"}), el("td", {cls: "num", text: fmt(r[STR])}),
             el("th", {text: "frequency in class"}), el("td", {cls: "num", text: pct(r[CF])})),
          el("tr", null, el("th", {text: "effect (\u03b4) [95% CI]"}), el("td", {cls: "num", text: effectText(r)}),
             el("th", {text: "q (BH)"}), el("td", {cls: "num", text: qfmt(r[Q])})),
          el("tr", null, el("th", {text: "present in class"}), el("td", {cls: "num", text: pct(r[PC])}),
             el("th", {text: "present in rest"}), el("td", {cls: "num", text: pct(r[PR])})),
          r[ET] !== null && r[ET] !== undefined ?
            el("tr", null, el("th", {text: "typical \u03b4 (most other classes reach it)"}),
               el("td", {cls: "num", id: "effect-typical", text: fmt(r[ET], 2)}), el("th", {text: ""}), el("td", {text: ""})) : null,
          hasContextOnly(r) ?
            el("tr", null, el("th", {text: "effect without the object (\u03b4) [95% CI]"}),
               el("td", {cls: "num", id: "context-only-effect", text: contextOnlyText(r)}), el("th", {text: ""}), el("td", {text: ""})) : null,
          r[RF] !== null && r[RF] !== undefined ?
            el("tr", null, el("th", {text: "SAE seeds making this bias claim"}), el("td", {cls: "num", id: "replicate-fraction", text: pct(r[RF])}),
               el("th", {text: ""}), el("td", {text: ""})) : null)));
    }
    var left = el("div", null);
    if (c.rows.length) {
      plot = scatter(c, pick);
      left.appendChild(el("div", {cls: "card"}, el("h2", {text: EVIDENCE ? "Alignment vs. effect" : "Alignment vs. strength"}), plot.node,
        el("div", {cls: "legend"},
          el("span", null, el("i", {cls: "dot-target"}), "target"), el("span", null, el("i", {cls: "dot-context"}), "context"),
          el("span", null, el("i", {cls: "dot-bias"}), "bias"), el("span", null, el("i", {cls: "dot-uncertain"}), "uncertain"),
          CHECK ? el("span", null, el("i", {cls: "dot-entangled"}), "entangled") : null,
          el("span", null, el("i", {cls: "line line-target"}), "target threshold"),
          el("span", null, el("i", {cls: "line line-bias"}), "bias threshold"))));
      left.querySelectorAll(".legend i").forEach(function (i) {
        var t = i.className.indexOf("bias") !== -1 ? 2 : i.className.indexOf("target") !== -1 ? 0 :
                i.className.indexOf("uncertain") !== -1 ? 3 : i.className.indexOf("entangled") !== -1 ? 4 : 1;
        if (i.classList.contains("line")) i.style.borderTopColor = COLORS[t]; else i.style.background = COLORS[t];
      });
    } else {
      left.appendChild(el("div", {cls: "card empty-note", text: "No candidate concepts for this class."}));
    }
    left.appendChild(picked);

    var right = el("div", null);
    [[0, "Target concepts", "the class itself"],
     [2, "Bias concepts", EVIDENCE ? "context over-represented in the class versus the rest (q \u2264 " + fmt(META.fdr, 2) +
       ", effect \u2265 " + fmt(META.min_effect, 3) + ")" + (CHECK ? ", also without the object" : "") : "context that stands out by strength"],
     CHECK ? [4, "Entangled with the object", "over-represented on whole images but not without the object " +
       "(context-only effect < " + fmt(META.min_effect, 3) + " or its CI reaches 0): the latent carries the class, not only its context"] : null,
     [1, "Context concepts", "other context (not bias)"],
     [3, "Uncertain", "target or context flips inside the alignment\u2019s CI"]]
    .filter(function (spec) { return spec !== null; })
    .forEach(function (spec) {
      var rows = c.rows.filter(function (r) { return r[TYPE] === spec[0]; })
                       .sort(function (a, b) { return b[YV] - a[YV]; });
      var list = el("ul", {cls: "clist", id: "list-" + TYPES[spec[0]]});
      rows.forEach(function (r) {
        list.appendChild(el("li", {"data-latent": r[LAT], on: {mouseenter: function () { pick(r); }}},
          tileOf(r[LAT]) || el("span", {cls: "tile"}),
          el("div", {cls: "meta"}, el("div", {cls: "name"}, conceptLink(r[LAT], c.id), el("span", {cls: "kind", text: "  #" + r[LAT]})),
             el("div", {cls: "scores", text: scoreLine(r)}))));
      });
      right.appendChild(el("div", {cls: "card"}, el("h2", null, badge(spec[0]), spec[1] + " (" + rows.length + ")"),
        el("div", {cls: "sub", text: spec[2]}),
        rows.length ? list : el("div", {cls: "empty-note", text: spec[0] === 2 && c.status ? c.status : "none"})));
    });
    main.appendChild(el("div", {cls: "split"}, left, right));
    var first = c.rows.filter(function (r) { return r[TYPE] === 2; })[0] || c.rows[0];
    if (first) pick(first);
  }

  // ------------------------------------------------------------------ concept view
  function figure(asset, caption, alt) {
    return el("figure", null, img(asset, alt), el("figcaption", {text: caption}));
  }

  function renderConcept(k, y) {
    var c = CONCEPTS[k];
    var inClasses = c["in"] || [];
    if ((y === null || !byId.has(y)) && inClasses.length) y = null;
    main.appendChild(el("div", {cls: "pager"}, el("a", {href: "#overview", text: "\u2190 overview"}),
      y !== null && byId.has(y) ? el("a", {href: "#class/" + y, text: "\u2190 class " + className(y)}) : null));
    main.appendChild(el("h1", {id: "concept-title", text: c.name || "unnamed latent"}));
    var naming = "latent #" + k + " \u00b7 named by " + (c.source || "?") +
      (c.score !== null && c.score !== undefined ? " \u00b7 naming score " + fmt(c.score) : "") +
      (c.clarity !== null && c.clarity !== undefined ? " \u00b7 clarity " + fmt(c.clarity) : "");
    main.appendChild(el("div", {cls: "sub", text: naming}));
    if (c.error) main.appendChild(el("div", {cls: "notes", text: "naming failed: " + c.error}));

    main.appendChild(el("div", {cls: "card"}, el("h2", {text: "Reference tile"}),
      tileOf(k, "tile-big") || el("div", {cls: "empty-note", text: "no reference tile"}),
      el("div", {cls: "facts", id: "concept-facts"}, fact("Images active", pct(c.freq)), fact("Mean when active", fmt(c.mwa)),
        fact("Max activation", fmt(c.max)), fact("Top-image label entropy", fmt(c.ent, 2)))));

    var members = (c.members || []).filter(function (m) { return String(m) !== String(k); });
    if (members.length) {  // a concept group: every member latent with its own reference tile
      var grid = el("div", {cls: "gallery", id: "member-tiles"});
      members.forEach(function (m) {
        grid.appendChild(el("div", null, el("a", {href: "#concept/" + m, text: conceptName(m) + " #" + m}), tileOf(m, "tile")));
      });
      main.appendChild(el("div", {cls: "card"}, el("h2", {text: "Other latents of this concept (" + members.length + ")"}), grid));
    }
    var top = el("div", {cls: "gallery", id: "top-images"});
    (c.top || []).forEach(function (t) {
      top.appendChild(figure(t[0], className(t[1]) + " \u00b7 " + fmt(t[2]), "image of " + className(t[1])));
    });
    main.appendChild(el("div", {cls: "card"}, el("h2", {text: "Top images in " + META.dataset + " (heatmap: where it fires)"}),
      (c.top || []).length ? top : el("div", {cls: "empty-note", text: "no images"})));

    var row = el("div", {cls: "row-flex"});
    var tc = c.tc || [];
    var peak = tc.length ? (tc[0][1] || 1) : 1;
    var tbody = el("tbody");
    tc.forEach(function (t) {
      var bar = el("div", {cls: "bar"}, el("span"));
      bar.firstChild.style.width = Math.max(2, 100 * (t[1] || 0) / peak) + "%";
      tbody.appendChild(el("tr", null, el("td", null, el("a", {href: "#concept/" + k + "/" + t[0], text: className(t[0])})),
        el("td", null, bar), el("td", {cls: "num", text: fmt(t[1])}), el("td", {cls: "num", text: pct(t[2])})));
    });
    row.appendChild(el("div", {cls: "card", style: null}, el("h2", {text: "Classes where it is strongest"}),
      tc.length ? el("table", {id: "top-classes"}, el("thead", null, el("tr", null, el("th", {text: "class"}), el("th", {text: ""}),
        el("th", {cls: "num", text: "strength"}), el("th", {cls: "num", text: "frequency"}))), tbody)
        : el("div", {cls: "empty-note", text: "no class statistics"})));
    var inList = el("ul", {cls: "clist", id: "candidate-in"});
    inList.appendChild(el("li", null, el("span", {cls: "kind", text: inClasses.length ? "" : "not a candidate of any class"})));
    inClasses.forEach(function (p) {
      inList.appendChild(el("li", null, badge(p[1]), classLink(p[0]),
        el("a", {href: "#concept/" + k + "/" + p[0], text: "  images of this class \u2192"})));
    });
    row.appendChild(el("div", {cls: "card"}, el("h2", {text: "Candidate in " + inClasses.length + (inClasses.length === 1 ? " class" : " classes")}), inList));
    main.appendChild(row);

    if (y === null && inClasses.length) y = inClasses[0][0];
    if (y !== null && byId.has(y)) {
      var ex = EXAMPLES[y + "/" + k];
      var box = el("div", {cls: "card", id: "class-examples"}, el("h2", null, "In class ", classLink(y), ": highest and lowest activation"));
      if (ex) {
        [["highest", ex[0]], ["lowest", ex[1]]].forEach(function (part) {
          var g = el("div", {cls: "gallery"});
          part[1].forEach(function (e) { g.appendChild(figure(e[0], part[0] + " \u00b7 " + fmt(e[1]), part[0] + " activation image")); });
          box.appendChild(el("div", {cls: "sub", text: part[0] + " activation"}));
          box.appendChild(part[1].length ? g : el("div", {cls: "empty-note", text: "none"}));
        });
      } else {
        box.appendChild(el("div", {cls: "empty-note", text: "no example images for this class"}));
      }
      main.appendChild(box);
    }
  }

  // ------------------------------------------------------------------ routing
  function route() {
    var parts = location.hash.replace(/^#/, "").split("/");
    main.replaceChildren();
    var view = "overview";
    if (parts[0] === "class" && byId.has(Number(parts[1]))) {
      view = "class"; renderClass(byId.get(Number(parts[1])));
    } else if (parts[0] === "concept" && has(CONCEPTS, parts[1])) {
      view = "concept"; renderConcept(parts[1], parts.length > 2 && parts[2] !== "" ? Number(parts[2]) : null);
    } else {
      renderOverview();
    }
    main.setAttribute("data-view", view);
    main.appendChild(el("footer", null, "Made by cscope " + (META.cscope_version || "") + " on " + (META.generated || "") +
      " \u00b7 offline report, no network access."));
    window.scrollTo(0, 0);
  }
  buildHeader();
  window.addEventListener("hashchange", route);
  route();
})();
"""
