// Line charts and a step strip drawn as SVG from the page's <script type="application/json" id="plot-data">.
// No library, no inline style: shapes get classes, colours live in dashboard.css.
"use strict";
(() => {
  const SVG = "http://www.w3.org/2000/svg";
  const W = 620, H = 230, LEFT = 64, RIGHT = 14, TOP = 12, BOTTOM = 30;

  function el(name, attrs, parent) {
    const node = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (parent) parent.appendChild(node);
    return node;
  }

  function label(parent, x, y, text, cls) {
    const node = el("text", { x, y, class: cls || "tick" }, parent);
    node.textContent = text;
    return node;
  }

  const finite = (v) => typeof v === "number" && Number.isFinite(v);

  function extent(values) {
    let lo = Infinity, hi = -Infinity;
    for (const v of values) if (finite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    if (lo === Infinity) return null;
    if (lo === hi) { lo -= 1; hi += 1; }
    return [lo, hi];
  }

  function fmt(v) {
    const a = Math.abs(v);
    return a !== 0 && (a >= 1e5 || a < 1e-2) ? v.toExponential(2) : String(Math.round(v * 1000) / 1000);
  }

  function empty(figure, text) {
    const p = document.createElement("p");
    p.className = "empty";
    p.textContent = text;
    figure.appendChild(p);
  }

  function frame(figure, xr, yr) {
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img" });
    figure.appendChild(svg);
    const sx = (x) => LEFT + ((x - xr[0]) / (xr[1] - xr[0])) * (W - LEFT - RIGHT);
    const sy = (y) => H - BOTTOM - ((y - yr[0]) / (yr[1] - yr[0])) * (H - TOP - BOTTOM);
    el("line", { x1: LEFT, y1: H - BOTTOM, x2: W - RIGHT, y2: H - BOTTOM, class: "axis" }, svg);
    el("line", { x1: LEFT, y1: TOP, x2: LEFT, y2: H - BOTTOM, class: "axis" }, svg);
    for (const y of [yr[0], (yr[0] + yr[1]) / 2, yr[1]]) label(svg, LEFT - 6, sy(y) + 4, fmt(y), "tick y");
    label(svg, sx(xr[0]), H - 10, `step ${fmt(xr[0])}`, "tick x start");
    label(svg, sx(xr[1]), H - 10, `step ${fmt(xr[1])}`, "tick x end");
    return { svg, sx, sy };
  }

  function markers(svg, marks, xr, sx) {
    for (const mark of marks || []) {
      if (!finite(mark.step) || mark.step < xr[0] || mark.step > xr[1]) continue;
      const g = el("g", { class: "marker" }, svg);
      el("line", { x1: sx(mark.step), y1: TOP, x2: sx(mark.step), y2: H - BOTTOM }, g);
      el("title", {}, g).textContent = `step ${mark.step}: ${mark.label}`;
    }
  }

  function lineChart(figure, data, marks) {
    const xr = extent(data.x);
    const yr = extent(data.series.flatMap((s) => s.y));
    if (!xr || !yr) { empty(figure, "No points to plot."); return; }
    const { svg, sx, sy } = frame(figure, xr, yr);
    markers(svg, marks, xr, sx);
    data.series.forEach((series, i) => {
      const g = el("g", { class: `series s${i % 8}`, "data-series": series.name }, svg);
      let run = [];
      const flush = () => {
        if (run.length > 1) el("polyline", { points: run.map((p) => p.join(",")).join(" ") }, g);
        else if (run.length === 1) el("circle", { cx: run[0][0], cy: run[0][1], r: 2.5 }, g);
        run = [];
      };
      series.y.forEach((y, j) => {
        const x = data.x[j];
        if (finite(x) && finite(y)) run.push([sx(x).toFixed(1), sy(y).toFixed(1)]);
        else flush();
      });
      flush();
      label(svg, W - RIGHT - 4, TOP + 12 + 13 * i, series.name, `legend s${i % 8}`);
    });
  }

  function strip(figure, states) {
    const steps = Object.keys(states).map(Number).filter(finite);
    const xr = extent(steps);
    if (!xr) { empty(figure, "No step was judged yet."); return; }
    const SW = 2 * W;  // the strip spans the page: twice as wide, so its text keeps the charts' size
    const svg = el("svg", { viewBox: `0 0 ${SW} 64`, class: "chart strip", role: "img" });
    figure.appendChild(svg);
    const span = xr[1] - xr[0];
    const width = Math.max(1, (SW - LEFT - RIGHT) / (span + 1));
    const sx = (x) => LEFT + ((x - xr[0]) / (span + 1)) * (SW - LEFT - RIGHT);
    const names = { 0: "not compared", 1: "disagreed", 2: "agreed" };
    const groups = {};
    for (const step of steps) {
      const state = names[states[String(step)]] || "not compared";
      if (!groups[state]) {
        groups[state] = el("g", { class: `series ${state.replace(" ", "-")}`, "data-series": state }, svg);
      }
      const rect = el("rect", { x: sx(step).toFixed(2), y: 8, width: width.toFixed(2), height: 30 }, groups[state]);
      el("title", {}, rect).textContent = `step ${step}: ${state}`;
    }
    label(svg, sx(xr[0]), 56, `step ${fmt(xr[0])}`, "tick x start");
    label(svg, SW - RIGHT, 56, `step ${fmt(xr[1])}`, "tick x end");
  }

  function main() {
    const source = document.getElementById("plot-data");
    if (!source) return;
    const data = JSON.parse(source.textContent);
    for (const figure of document.querySelectorAll("figure[data-plot]")) {
      const key = figure.dataset.plot;
      if (key === "fingerprint") strip(figure, data.fingerprint);
      else if (data.plots[key]) lineChart(figure, data.plots[key], data.alerts);
    }
  }

  main();
})();
