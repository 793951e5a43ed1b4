// Label placement for the map and the radar: pure geometry, no DOM, so the
// browser test can check it on its own (web-test/browser.mjs).
//
// Each label belongs to a dot. It is tried beside its dot in twelve
// places, then up to three steps further out (drawn with a leader
// line, which crosses no other label); a spot must overlap no placed label,
// no leader line, no dot, no fixed box (ring
// captions, "you", the compass), stay inside the bounds, and, beside its
// dot, have no other dot nearer than its own (so it reads as that dot's;
// further out, the leader line says whose it is). Every label
// gets the nearest such spot it can, most important labels first: beside
// the dot before further out, the whole text (name and distance) before
// the name alone, and a spot clear of the rings before any over one (the
// label's opaque background then hides the ring under it). A label that
// fits nowhere is left out (its dot keeps its name for pointer and
// screen-reader users).

const GAP = 3;      // between a dot and its label
const PAD = 2;      // kept between two labels
const CLEAR = 4;    // another dot is at least this much farther from a label than its own
// Above, below, right, left; above or below shifted half a side; then
// the corners.
const DIRECTIONS = [
  [0, -1], [0, 1], [1, 0], [-1, 0],
  [0.5, -1], [-0.5, -1], [0.5, 1], [-0.5, 1],
  [1, -1], [-1, -1], [1, 1], [-1, 1],
];
const STEPS = 4;
const FAR_STEP = 1.2; // each step further out, in label heights

const overlaps = (a, b, pad = 0) =>
  a.x0 < b.x1 + pad && b.x0 < a.x1 + pad && a.y0 < b.y1 + pad && b.y0 < a.y1 + pad;

// Distance from (cx, cy) to the nearest point of a box, and to its farthest corner.
function reach(box, cx, cy) {
  const dx = Math.max(box.x0 - cx, 0, cx - box.x1);
  const dy = Math.max(box.y0 - cy, 0, cy - box.y1);
  const fx = Math.max(Math.abs(box.x0 - cx), Math.abs(box.x1 - cx));
  const fy = Math.max(Math.abs(box.y0 - cy), Math.abs(box.y1 - cy));
  return [Math.hypot(dx, dy), Math.hypot(fx, fy)];
}

const touchesDot = (box, dot) => reach(box, dot.x, dot.y)[0] < dot.r;

const crossesRing = (box, ring) => {
  const [near, far] = reach(box, ring.cx, ring.cy);
  return near < ring.r && ring.r < far;
};

// Whether the segment (x0, y0)–(x1, y1) passes through the box (Liang–Barsky).
function cuts(x0, y0, x1, y1, b) {
  let t0 = 0;
  let t1 = 1;
  const dx = x1 - x0;
  const dy = y1 - y0;
  for (const [p, q] of [[-dx, x0 - b.x0], [dx, b.x1 - x0], [-dy, y0 - b.y0], [dy, b.y1 - y0]]) {
    if (p === 0) { if (q < 0) return false; continue; }
    const t = q / p;
    if (p < 0) t0 = Math.max(t0, t); else t1 = Math.min(t1, t);
    if (t0 > t1) return false;
  }
  return true;
}

/** The box of a label `w` × `h` whose centre is at (x, y). */
export const boxAt = (x, y, w, h) => ({ x0: x - w / 2, y0: y - h / 2, x1: x + w / 2, y1: y + h / 2 });

/**
 * Places labels, most important first.
 *
 * - `labels`: [{x, y, r, w, h, short?}]: the dot's centre and radius, the
 *   label's size, and the size {w, h} of a shorter text to fall back to
 *   where the whole one fits nowhere.
 * - `scene`: {dots: [{x, y, r}], boxes: [box], rings: [{cx, cy, r}], bounds: box}.
 *   Every label's own dot should be among `dots`.
 *
 * Returns, per label, null (left out) or {x, y, box, leader, short}: the
 * label's centre, its box, whether to draw a leader line to it (it stands
 * off its dot, or at its corner) and whether it is the shorter text.
 */
export function placeLabels(labels, scene) {
  const placed = [...(scene.boxes ?? [])];
  const leaders = []; // [x0, y0, x1, y1] of the leader lines drawn so far
  const dots = scene.dots ?? [];
  const rings = scene.rings ?? [];
  const bounds = scene.bounds;
  const spots = labels.map(() => null);
  // Nearer spots first for everyone: one label's far spot (with a leader)
  // must not take another's spot beside its own dot. At each distance, a
  // spot clear of the rings first, then one over a ring.
  const passes = [];
  for (const ringsOk of [false, true]) {
    for (let step = 0; step < STEPS; step++) {
      for (const short of [false, true]) passes.push([short, step, ringsOk]);
    }
  }
  for (const [short, step, ringsOk] of passes) {
    {
      labels.forEach((full, i) => {
        if (spots[i] || (short && !full.short)) return;
        const l = short ? { ...full, ...full.short } : full;
        for (const [ux, uy] of DIRECTIONS) {
          const far = step * FAR_STEP * l.h;
          const x = l.x + ux * (l.r + GAP + l.w / 2 + far);
          const y = l.y + uy * (l.r + GAP + l.h / 2 + far);
          const box = boxAt(x, y, l.w, l.h);
          if (bounds && (box.x0 < bounds.x0 || box.y0 < bounds.y0 || box.x1 > bounds.x1 || box.y1 > bounds.y1)) continue;
          if (placed.some((p) => overlaps(box, p, PAD))) continue;
          if (dots.some((d) => touchesDot(box, d))) continue;
          // Beside its dot, it reads as that dot's only if no other dot is
          // nearer (further out, its leader line says whose it is).
          const own = reach(box, l.x, l.y)[0];
          if (step === 0 && dots.some((d) => (d.x !== l.x || d.y !== l.y) && reach(box, d.x, d.y)[0] < own + CLEAR)) continue;
          if (!ringsOk && rings.some((r) => crossesRing(box, r))) continue;
          // Off its dot, or at its corner, a label has a leader line: none
          // runs through another label, and no label lies over one.
          const leader = step > 0 || (Math.abs(ux) === 1 && Math.abs(uy) === 1);
          if (leaders.some(([ax, ay, bx, by]) => cuts(ax, ay, bx, by, box))) continue;
          if (leader && placed.some((p) => cuts(l.x, l.y, x, y, p))) continue;
          if (leader) leaders.push([l.x, l.y, x, y]);
          placed.push(box);
          spots[i] = { x, y, box, leader, short };
          return;
        }
      });
    }
  }
  return spots;
}

/**
 * The checks placeLabels keeps, for tests: what a set of boxes overlaps,
 * and (given `owners`, each box's own dot {x, y} or null where a leader
 * line joins them) which box has another dot nearer than its own.
 */
export function conflicts(boxes, scene, owners = []) {
  const found = [];
  boxes.forEach((b, i) => {
    if (!b) return;
    const own = owners[i];
    if (own) {
      const mine = reach(b, own.x, own.y)[0];
      (scene.dots ?? []).forEach((d, j) => {
        if ((d.x !== own.x || d.y !== own.y) && reach(b, d.x, d.y)[0] < mine) found.push(`label ${i} is nearer dot ${j} than its own`);
      });
    }
    boxes.forEach((o, j) => { if (o && j > i && overlaps(b, o)) found.push(`label ${i} overlaps label ${j}`); });
    (scene.boxes ?? []).forEach((o, j) => { if (overlaps(b, o)) found.push(`label ${i} overlaps fixed box ${j}`); });
    (scene.dots ?? []).forEach((d, j) => { if (touchesDot(b, d)) found.push(`label ${i} overlaps dot ${j}`); });
    (scene.leaders ?? []).forEach(([ax, ay, bx, by], j) => { if (j !== i && cuts(ax, ay, bx, by, b)) found.push(`leader ${j} crosses label ${i}`); });
    (scene.rings ?? []).forEach((r, j) => { if (crossesRing(b, r)) found.push(`label ${i} crosses ring ${j}`); });
    const bd = scene.bounds;
    if (bd && (b.x0 < bd.x0 || b.y0 < bd.y0 || b.x1 > bd.x1 || b.y1 > bd.y1)) found.push(`label ${i} leaves the bounds`);
  });
  return found;
}
