// Sparklines as inline SVG from the history of /stats samples.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 600;
const HEIGHT = 120;
const PAD = { top: 8, right: 6, bottom: 16, left: 48 };

function svg(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, value);
  return el;
}

function niceMax(value) {
  if (value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

/**
 * Draw `series` ([{label, color, values: number[]}]) into `container`;
 * `format(v)` labels the axis. `summary` becomes the accessible name.
 */
export function sparkline(container, series, { format, summary, capacity }) {
  const points = Math.max(capacity, 2);
  const max = niceMax(Math.max(0, ...series.flatMap((s) => s.values.filter(Number.isFinite))));
  const root = svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, preserveAspectRatio: "none", role: "img", "aria-label": summary });
  const innerW = WIDTH - PAD.left - PAD.right;
  const innerH = HEIGHT - PAD.top - PAD.bottom;
  for (const fraction of [0, 0.5, 1]) {
    const y = PAD.top + innerH * (1 - fraction);
    root.append(svg("line", { class: "grid", x1: PAD.left, x2: WIDTH - PAD.right, y1: y, y2: y }));
    const label = svg("text", { class: "axis", x: PAD.left - 6, y: y + 3, "text-anchor": "end" });
    label.textContent = format(max * fraction);
    root.append(label);
  }
  const axis = svg("text", { class: "axis", x: WIDTH - PAD.right, y: HEIGHT - 3, "text-anchor": "end" });
  axis.textContent = "now";
  root.append(axis);
  for (const { color, values } of series) {
    const offset = points - values.length;
    const coords = values
      .map((v, i) => [PAD.left + ((offset + i) / (points - 1)) * innerW, PAD.top + innerH * (1 - (Number.isFinite(v) ? v : 0) / max)])
      .map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`);
    if (coords.length) {
      root.append(svg("polyline", {
        points: coords.join(" "), fill: "none", "stroke-width": 2,
        "stroke-linejoin": "round", "vector-effect": "non-scaling-stroke",
      }));
      root.lastChild.style.stroke = color; // a CSS variable: only CSS resolves var()
    }
  }
  container.replaceChildren(root);
}
