/* cirgen report viewer: filters, sorting, paging, lazy chunk loading and SVG charts.
 *
 * Data comes from data/index.js (CIRGEN_INDEX: one small columnar record per row, enough to
 * filter, sort and chart every row) and data/chunk-NNNNN.js (card texts and thumbnail names),
 * which are added as <script> tags only when a page shows one of their rows: fetch() of file://
 * URLs is blocked in Chromium, script tags are not.
 *
 * Safety: dataset text is untrusted. It only ever reaches the page through textContent or
 * createTextNode (never innerHTML), so `<script>` in a caption is shown, not run.
 */
"use strict";
(function () {
  const IDX = window.CIRGEN_INDEX;
  const $ = (id) => document.getElementById(id);
  if (!IDX) {
    const e = $("error");
    e.textContent = "data/index.js did not load: is the report folder complete?";
    e.hidden = false;
    return;
  }

  // ---------- DOM helpers (text is always set as text) ----------
  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (k === "data") Object.assign(e.dataset, v);
      else e.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return e;
  }
  const SVGNS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  const fmt = (v, digits) => (v === null || v === undefined ? "—" :
    (Number.isInteger(v) ? String(v) : v.toFixed(digits === undefined ? 3 : digits)));

  // ---------- index lookups ----------
  const facetBy = Object.fromEntries(IDX.facets.map((f) => [f.key, f]));
  const numberBy = Object.fromEntries(IDX.numbers.map((n) => [n.key, n]));
  const valueOf = (key, i) => { const f = facetBy[key]; return f ? f.values[f.codes[i]] : undefined; };

  const state = { sel: {}, sort: "", desc: true, page: 0, size: 48 };
  let selected = [];
  let renderToken = 0;

  // ---------- lazy chunk loading ----------
  const chunks = new Map();
  const waiting = new Map();
  window.CIRGEN_CHUNK = function (k, rows) {
    chunks.set(k, rows);
    (waiting.get(k) || []).forEach((w) => w.resolve(rows));
    waiting.delete(k);
  };
  function loadChunk(k) {
    if (chunks.has(k)) return Promise.resolve(chunks.get(k));
    return new Promise((resolve, reject) => {
      let list = waiting.get(k);
      if (!list) {
        list = [];
        waiting.set(k, list);
        const s = document.createElement("script");
        s.src = "data/chunk-" + String(k).padStart(5, "0") + ".js";
        s.onerror = () => {
          (waiting.get(k) || []).forEach((w) => w.reject(new Error("cannot load " + s.src)));
          waiting.delete(k);
          s.remove(); // allow a retry on the next render
        };
        document.head.appendChild(s);
      }
      list.push({ resolve, reject });
    });
  }
  const rowData = (i) => chunks.get(Math.floor(i / IDX.chunk_size))[i % IDX.chunk_size];

  // ---------- selection ----------
  // One pass over the rows gives the selection and every chip's count. A chip counts the rows
  // that pass all the *other* facets' filters (what clicking it would add): a row failing no
  // filter counts for every facet, a row failing exactly one counts for that facet only.
  let chipCounts = [];
  function computeSelection() {
    const F = IDX.facets, nf = F.length;
    const active = F.map((f) => (state.sel[f.key] && state.sel[f.key].size ? state.sel[f.key] : null));
    const codes = F.map((f) => f.codes);
    chipCounts = F.map((f) => new Array(f.values.length).fill(0));
    const out = [];
    for (let i = 0; i < IDX.n; i++) {
      let fails = 0, failed = -1;
      for (let k = 0; k < nf; k++) {
        if (active[k] && !active[k].has(codes[k][i])) { failed = k; if (++fails > 1) break; }
      }
      if (fails === 0) {
        out.push(i);
        for (let k = 0; k < nf; k++) chipCounts[k][codes[k][i]]++;
      } else if (fails === 1) chipCounts[failed][codes[failed][i]]++;
    }
    if (state.sort) {
      const v = numberBy[state.sort].values;
      const sign = state.desc ? -1 : 1;
      out.sort((a, b) => {
        const x = v[a], y = v[b];
        if (x === null) return y === null ? a - b : 1; // missing values last either way
        if (y === null) return -1;
        return x === y ? a - b : sign * (x - y);
      });
    }
    return out;
  }

  // ---------- header, sources, controls ----------
  function renderHeader() {
    document.title = IDX.title;
    $("title").textContent = IDX.title;
    const st = facetBy.status;
    let sub = IDX.n + (IDX.kind === "retrieval" ? " queries" : " rows");
    if (st) {
      const c = st.values.map((_, k) => st.codes.filter((x) => x === k).length);
      sub += " (" + st.values.map((v, k) => c[k] + " " + v).join(", ") + ")";
    }
    $("subtitle").textContent = sub;
    if (!IDX.sources.length) return;
    const cols = [["name", "dataset"], ["recipe", "recipe"], ["tier", "tier"], ["kept_rows", "kept rows"],
      ["rejected_rows", "rejected rows"], ["generated", "generated"], ["yield", "yield"],
      ["seconds_per_1k_kept", "s per 1k kept"], ["complete", "complete"], ["path", "path"]];
    const table = el("table", { class: "sources" },
      el("thead", {}, el("tr", {}, ...cols.map(([, h]) => el("th", { text: h })))),
      el("tbody", {}, ...IDX.sources.map((s) => el("tr", {}, ...cols.map(([k]) =>
        el("td", { text: s[k] === null || s[k] === undefined ? "—" : k === "yield" ? (100 * s[k]).toFixed(1) + "%" : String(s[k]) }))))));
    $("sources").appendChild(table);
  }

  function renderControls() {
    const box = $("facets");
    for (const f of IDX.facets) {
      const chips = f.values.map((v, k) => el("button", {
        type: "button", class: "chip", "aria-pressed": "false", data: { facet: f.key, code: String(k), value: v },
        onclick: () => toggle(f.key, k),
      }, el("span", { class: "v", text: v }), el("span", { class: "n" })));
      box.appendChild(el("div", { class: "facet", data: { facet: f.key } },
        el("span", { class: "facet-label", text: f.label }), ...chips));
    }
    const sort = $("sort");
    sort.appendChild(el("option", { value: "", text: "dataset order" }));
    for (const n of IDX.numbers) sort.appendChild(el("option", { value: n.key, text: n.label }));
    sort.addEventListener("change", () => { state.sort = sort.value; update(true); });
    $("order").addEventListener("change", (e) => { state.desc = e.target.value === "desc"; update(true); });
    $("page-size").addEventListener("change", (e) => { state.size = +e.target.value; update(true); });
    $("reset").addEventListener("click", () => { state.sel = {}; update(true); });
  }

  function toggle(key, code) {
    const s = state.sel[key] || (state.sel[key] = new Set());
    if (s.has(code)) s.delete(code); else s.add(code);
    update(true);
  }

  function updateFacetCounts() {
    IDX.facets.forEach((f, fk) => {
      const s = state.sel[f.key];
      document.querySelectorAll('.facet[data-facet="' + CSS.escape(f.key) + '"] .chip').forEach((c) => {
        const k = +c.dataset.code, n = chipCounts[fk][k];
        c.querySelector(".n").textContent = String(n);
        c.setAttribute("aria-pressed", s && s.has(k) ? "true" : "false");
        c.classList.toggle("empty", n === 0);
      });
    });
    $("count").textContent = selected.length + " of " + IDX.n + " shown";
  }

  // ---------- charts ----------
  function barChart(title, bars, opts) {
    opts = opts || {};
    const W = 360, LW = 130, RH = 18, H = bars.length * RH + 8;
    const max = opts.max || Math.max(1e-12, ...bars.map((b) => b[1] || 0));
    const s = svg("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, class: "chart-svg" });
    bars.forEach(([label, value], r) => {
      const y = 4 + r * RH;
      const w = Math.max(0, ((value || 0) / max) * (W - LW - 70));
      s.appendChild(svg("text", { x: LW - 6, y: y + 13, "text-anchor": "end", class: "lbl" }, String(label)));
      s.appendChild(svg("rect", { x: LW, y: y + 2, width: w, height: RH - 5, class: "bar" + (opts.cls ? " " + opts.cls(label) : "") }));
      s.appendChild(svg("text", { x: LW + w + 4, y: y + 13, class: "val" },
        value === null ? "—" : (opts.pct ? (100 * value).toFixed(1) + "%" : fmt(value)) + (opts.unit || "")));
    });
    return el("figure", { class: "chart" }, el("figcaption", { text: title }), s);
  }

  function histogram(num, rows, splitKey) {
    const v = num.values;
    let lo = Infinity, hi = -Infinity;
    for (const x of v) if (x !== null) { if (x < lo) lo = x; if (x > hi) hi = x; }
    if (lo === Infinity) return null;
    const B = 20, span = hi - lo || 1;
    const split = splitKey && facetBy[splitKey];
    const groups = split ? split.values.length : 1;
    const counts = Array.from({ length: B }, () => new Array(groups).fill(0));
    let missing = 0;
    for (const i of rows) {
      const x = v[i];
      if (x === null) { missing++; continue; }
      const b = Math.min(B - 1, Math.floor(((x - lo) / span) * B));
      counts[b][split ? split.codes[i] : 0]++;
    }
    const W = 360, H = 130, P = 22, bw = (W - 2 * P) / B;
    const top = Math.max(1, ...counts.map((c) => c.reduce((a, b) => a + b, 0)));
    const s = svg("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, class: "chart-svg" });
    counts.forEach((c, b) => {
      let y = H - P;
      c.forEach((n, g) => {
        const h = (n / top) * (H - 2 * P);
        y -= h;
        s.appendChild(svg("rect", { x: P + b * bw + 1, y: y, width: bw - 2, height: h, class: "bar g" + g }));
      });
    });
    s.appendChild(svg("line", { x1: P, x2: W - P, y1: H - P, y2: H - P, class: "axis" }));
    s.appendChild(svg("text", { x: P, y: H - 6, class: "lbl" }, fmt(lo)));
    s.appendChild(svg("text", { x: W - P, y: H - 6, "text-anchor": "end", class: "lbl" }, fmt(hi)));
    s.appendChild(svg("text", { x: P, y: 12, class: "lbl" }, "max " + top));
    const legend = split ? el("div", { class: "legend" }, ...split.values.map((name, g) =>
      el("span", { class: "key g" + g, text: name }))) : null;
    const title = num.label + " (" + (rows.length - missing) + " rows" + (missing ? ", " + missing + " missing" : "") + ")";
    return el("figure", { class: "chart" }, el("figcaption", { text: title }), s, legend);
  }

  function renderCharts() {
    const box = $("charts");
    const figs = [];
    if (IDX.pass_facets.length) {
      const bars = IDX.pass_facets.map((key) => {
        const f = facetBy[key], ok = f.values.indexOf("pass"), bad = f.values.indexOf("fail");
        let p = 0, t = 0;
        for (const i of selected) { const c = f.codes[i]; if (c === ok) { p++; t++; } else if (c === bad) t++; }
        return [f.label, t ? p / t : null];
      });
      figs.push(barChart("Pass rate per criterion", bars, { max: 1, pct: true }));
    }
    for (const key of ["failure", "reject_reason"]) {
      const f = facetBy[key];
      if (!f) continue;
      const c = new Array(f.values.length).fill(0);
      for (const i of selected) c[f.codes[i]]++;
      figs.push(barChart(f.label + " (rows)", f.values.map((v, k) => [v, c[k]]),
        { cls: (label) => (label === "none" ? "ok" : "warn") }));
    }
    for (const num of IDX.numbers) {
      const h = histogram(num, selected, IDX.kind === "triplets" ? "status" : null);
      if (h) figs.push(h);
    }
    for (const ch of IDX.charts) figs.push(barChart(ch.title, ch.bars, { max: ch.max, unit: ch.unit ? " " + ch.unit : "" }));
    box.replaceChildren(...figs);
  }

  // ---------- cards ----------
  function thumb(name, caption, cls) {
    const img = name ? el("img", { src: "thumbs/" + name, alt: caption, loading: "lazy", decoding: "async" })
      : el("div", { class: "noimg", text: "no image" });
    return el("figure", { class: "thumb" + (cls ? " " + cls : "") }, img, el("figcaption", { text: caption }));
  }
  const badge = (text, cls) => el("span", { class: "badge " + (cls || ""), text: text });

  function tripletCard(i, d) {
    const status = valueOf("status", i), reason = valueOf("reject_reason", i), failure = valueOf("failure", i);
    const badges = [badge(status === "rejected" ? "rejected: " + reason : "kept", status === "rejected" ? "bad" : "good")];
    if (failure && failure !== "none") badges.push(badge("failure: " + failure, "warn"));
    badges.push(badge("quality: " + valueOf("quality", i)), badge(valueOf("edit_type", i)));
    if (facetBy.dataset) badges.push(badge(valueOf("dataset", i), "src"));
    const scoreRows = [];
    const shown = new Set();
    for (const key of IDX.score_numbers) {
      const name = key.replace(/^score_/, ""), pk = "pass_" + name;
      const pv = facetBy[pk] ? valueOf(pk, i) : null;
      if (pv) shown.add(pk);
      scoreRows.push(el("tr", { class: pv === "fail" ? "fail" : pv === "pass" ? "pass" : "" },
        el("td", { text: name }), el("td", { class: "num", text: fmt(numberBy[key].values[i]) }),
        el("td", { text: pv === "pass" ? "✓ pass" : pv === "fail" ? "✗ fail" : "" })));
    }
    for (const pk of IDX.pass_facets) {
      if (shown.has(pk)) continue;
      const pv = valueOf(pk, i);
      scoreRows.push(el("tr", { class: pv === "fail" ? "fail" : pv === "pass" ? "pass" : "" },
        el("td", { text: pk.replace(/^pass_/, "") }), el("td", { class: "num", text: "" }),
        el("td", { text: pv === "pass" ? "✓ pass" : pv === "fail" ? "✗ fail" : pv })));
    }
    return el("article", { class: "card " + status, data: { row: String(i), status: status, failure: failure, reason: reason } },
      el("div", { class: "imgs" }, thumb(d.ref, "reference"), el("span", { class: "arrow", text: "→" }), thumb(d.tgt, "target")),
      el("p", { class: "mod", text: d.mod || "" }),
      el("p", { class: "cap" }, el("span", { class: "k", text: "source " }), el("span", { class: "src", text: d.src || "" })),
      el("p", { class: "cap" }, el("span", { class: "k", text: "target " }), el("span", { class: "dst", text: d.dst || "" })),
      el("div", { class: "badges" }, ...badges),
      scoreRows.length ? el("table", { class: "scores" }, el("tbody", {}, ...scoreRows)) : null,
      el("div", { class: "id", text: d.id + " · " + fmt(numberBy.seconds ? numberBy.seconds.values[i] : null, 4) + " s" }));
  }

  function retrievalCard(i, d) {
    const first = numberBy.first_hit.values[i];
    const results = d.results.map((r, k) => {
      const f = thumb(r.img, "#" + (k + 1) + " " + r.id + " " + fmt(r.score), r.hit ? "hit" : "miss");
      if (r.hit) f.appendChild(el("span", { class: "mark", text: "✓ hit" }));
      return f;
    });
    const extra = Object.entries(d.extra || {}).map(([k, v]) => el("p", { class: "cap" }, el("span", { class: "k", text: k + " " }), v));
    return el("article", { class: "card query " + (first === null ? "nohit" : "hashit"), data: { row: String(i), firstHit: first === null ? "none" : String(first) } },
      el("div", { class: "qhead" },
        badge(first === null ? "no hit in top " + d.results.length : "first hit at rank " + first, first === 1 ? "good" : first === null ? "bad" : "warn"),
        facetBy.group ? badge(valueOf("group", i), "src") : null,
        el("span", { class: "id", text: "query " + d.id + (d.ref_id ? " · reference " + d.ref_id : "") })),
      el("div", { class: "qbody" },
        el("div", { class: "imgs" }, thumb(d.ref, "reference"), d.tgt ? thumb(d.tgt, "target") : null),
        el("div", { class: "qtext" },
          el("p", { class: "mod", text: d.text || "" }),
          el("p", { class: "cap" }, el("span", { class: "k", text: "targets " }), d.targets.join(", ")),
          ...extra)),
      el("div", { class: "results" }, ...results));
  }

  // ---------- paging ----------
  function renderPager(pages) {
    for (const id of ["pager-top", "pager-bottom"]) {
      const p = $(id);
      const start = selected.length ? state.page * state.size + 1 : 0;
      const end = Math.min(selected.length, (state.page + 1) * state.size);
      p.replaceChildren(
        el("button", { type: "button", class: "prev", disabled: state.page <= 0 ? "" : null,
          onclick: () => { state.page--; renderPage(); } }, "« prev"),
        el("span", { class: "pageinfo", text: "page " + (state.page + 1) + " of " + pages + " · rows " + start + "–" + end + " of " + selected.length }),
        el("button", { type: "button", class: "next", disabled: state.page >= pages - 1 ? "" : null,
          onclick: () => { state.page++; renderPage(); } }, "next »"));
    }
  }

  async function renderPage() {
    const token = ++renderToken;
    const pages = Math.max(1, Math.ceil(selected.length / state.size));
    state.page = Math.max(0, Math.min(state.page, pages - 1));
    renderPager(pages);
    const rows = selected.slice(state.page * state.size, (state.page + 1) * state.size);
    const need = [...new Set(rows.map((i) => Math.floor(i / IDX.chunk_size)))];
    document.body.classList.add("loading");
    try {
      await Promise.all(need.map(loadChunk));
    } catch (e) {
      $("error").textContent = String(e.message || e);
      $("error").hidden = false;
      return;
    } finally {
      document.body.classList.remove("loading");
    }
    if (token !== renderToken) return; // a newer render started while chunks were loading
    const make = IDX.kind === "retrieval" ? retrievalCard : tripletCard;
    const frag = document.createDocumentFragment();
    for (const i of rows) frag.appendChild(make(i, rowData(i)));
    if (!rows.length) frag.appendChild(el("p", { class: "empty", text: "No rows match these filters." }));
    $("cards").replaceChildren(frag);
    document.body.dataset.rendered = String(token); // tests and the benchmark wait on this
    if (!window.CIRGEN_FIRST_RENDER_MS) window.CIRGEN_FIRST_RENDER_MS = performance.now();
  }

  function update(resetPage) {
    if (resetPage) state.page = 0;
    selected = computeSelection();
    const page = renderPage(); // starts loading the page's chunks; counts and charts meanwhile
    updateFacetCounts();
    renderCharts();
    return page;
  }

  renderHeader();
  renderControls();
  update(true);
})();
