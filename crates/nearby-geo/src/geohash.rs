//! Geohash cells of length 5 (about 4.9 km × 4.9 km at the equator), the
//! channels of "strangers nearby": a session publishes on its own cell and
//! listens to the cells around it.
//!
//! A cell is held as its row and column on the geohash grid (4096 rows of
//! latitude, 8192 columns of longitude), not as a string: neighbours are
//! then index arithmetic, which wraps at the antimeridian (column 8191's
//! east neighbour is column 0) and stops at the poles (the top row has no
//! northern neighbours), where re-encoding an offset point (what the
//! `geohash` crate's `neighbor` does) fails or wraps wrongly. The string
//! form is only for names and logs, and matches the standard encoding.

use crate::Point;

/// Rows of latitude (12 bits of a 25-bit geohash).
const ROWS: u32 = 1 << 12;
/// Columns of longitude (13 bits).
const COLS: u32 = 1 << 13;
const BASE32: &[u8; 32] = b"0123456789bcdefghjkmnpqrstuvwxyz";

/// One geohash-5 cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GeoCell {
    row: u32,
    col: u32,
}

impl GeoCell {
    /// The cell holding `p`.
    pub fn of(p: Point) -> Self {
        let row = ((p.lat() + 90.0) / 180.0 * f64::from(ROWS)).floor();
        let col = ((p.lon() + 180.0) / 360.0 * f64::from(COLS)).floor();
        Self {
            row: (row.max(0.0) as u32).min(ROWS - 1),
            col: (col.max(0.0) as u32).min(COLS - 1),
        }
    }

    /// The 25-bit geohash integer (bits interleaved, longitude first): a
    /// compact key for channels.
    pub fn id(self) -> u32 {
        let mut id = 0u32;
        for i in (0..13).rev() {
            id = (id << 1) | ((self.col >> i) & 1);
            if i > 0 {
                id = (id << 1) | ((self.row >> (i - 1)) & 1);
            }
        }
        id
    }

    /// The cell of a [`GeoCell::id`]; `None` past 25 bits.
    pub fn from_id(id: u32) -> Option<Self> {
        if id >= 1 << 25 {
            return None;
        }
        let (mut row, mut col) = (0u32, 0u32);
        for bit in (0..25).rev() {
            let b = (id >> bit) & 1;
            // From the top: bit 24 is longitude, 23 latitude, and so on.
            if (24 - bit) % 2 == 0 {
                col = (col << 1) | b;
            } else {
                row = (row << 1) | b;
            }
        }
        Some(Self { row, col })
    }

    /// The standard geohash string (5 characters).
    pub fn geohash(self) -> String {
        let id = self.id();
        (0..5)
            .rev()
            .map(|i| char::from(BASE32[((id >> (i * 5)) & 31) as usize]))
            .collect()
    }

    /// The cell's centre.
    pub fn centre(self) -> Point {
        let lat = -90.0 + (f64::from(self.row) + 0.5) * 180.0 / f64::from(ROWS);
        let lon = -180.0 + (f64::from(self.col) + 0.5) * 360.0 / f64::from(COLS);
        Point { lat, lon }
    }

    /// This cell and those around it: 9 cells, fewer in the polar rows
    /// (none beyond the pole), wrapping across the antimeridian; each once.
    pub fn neighbourhood(self) -> Vec<GeoCell> {
        let mut cells = Vec::with_capacity(9);
        for dr in [-1i64, 0, 1] {
            let row = i64::from(self.row) + dr;
            if !(0..i64::from(ROWS)).contains(&row) {
                continue;
            }
            for dc in [-1i64, 0, 1] {
                let col = (i64::from(self.col) + dc).rem_euclid(i64::from(COLS));
                let cell = GeoCell {
                    row: row as u32,
                    col: col as u32,
                };
                if !cells.contains(&cell) {
                    cells.push(cell);
                }
            }
        }
        cells
    }

    /// Whether `p` lies in this cell grown by `margin` (a fraction of the
    /// cell's size) on every side.
    pub fn holds_with_margin(self, p: Point, margin: f64) -> bool {
        let (h, w) = (180.0 / f64::from(ROWS), 360.0 / f64::from(COLS));
        let c = self.centre();
        let dlon = (p.lon() - c.lon() + 540.0).rem_euclid(360.0) - 180.0;
        (p.lat() - c.lat()).abs() <= h * (0.5 + margin) && dlon.abs() <= w * (0.5 + margin)
    }

    /// Where a session at `p` that listens around `current` should listen:
    /// it stays while `p` is within [`HYSTERESIS`] of `current`, so a user
    /// walking along a border does not flap between two neighbourhoods.
    pub fn settle(current: Option<GeoCell>, p: Point) -> GeoCell {
        match current {
            Some(c) if c.holds_with_margin(p, HYSTERESIS) => c,
            _ => Self::of(p),
        }
    }
}

/// How far past a border (as a fraction of the cell, about 500 m at the
/// equator) a session moves its subscriptions.
pub const HYSTERESIS: f64 = 0.1;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(lat: f64, lon: f64) -> Point {
        Point::new(lat, lon).unwrap()
    }

    #[test]
    fn strings_match_the_standard_encoding() {
        assert_eq!(GeoCell::of(p(37.8324, 112.5584)).geohash(), "ww8p1");
        assert_eq!(GeoCell::of(p(57.64911, 10.40744)).geohash(), "u4pru");
        assert_eq!(GeoCell::of(p(-90.0, -180.0)).geohash(), "00000");
        assert_eq!(GeoCell::of(p(90.0, 180.0)).geohash(), "zzzzz");
    }

    #[test]
    fn neighbours_wrap_at_the_antimeridian_and_stop_at_the_poles() {
        let east_edge = GeoCell::of(p(0.01, 179.99));
        let west_edge = GeoCell::of(p(0.01, -179.99));
        assert!(east_edge.neighbourhood().contains(&west_edge));
        assert!(west_edge.neighbourhood().contains(&east_edge));
        let pole = GeoCell::of(p(90.0, 10.0));
        assert_eq!(pole.neighbourhood().len(), 6, "no row beyond the pole");
        assert_eq!(GeoCell::of(p(-90.0, 10.0)).neighbourhood().len(), 6);
        assert_eq!(GeoCell::of(p(37.5, 127.0)).neighbourhood().len(), 9);
    }

    #[test]
    fn a_walk_along_a_border_does_not_flap() {
        let c = GeoCell::of(p(37.5, 127.0));
        let w = 360.0 / f64::from(COLS);
        let border = c.centre().lon() + w / 2.0;
        let mut at = Some(c);
        // Zig-zag 50 m either side of the eastern border: stays put.
        for i in 0..20 {
            let off = if i % 2 == 0 { -0.0005 } else { 0.0005 };
            at = Some(GeoCell::settle(at, p(c.centre().lat(), border + off)));
            assert_eq!(at, Some(c));
        }
        // Well past it: moves, once.
        let far = p(c.centre().lat(), border + w * 0.3);
        assert_eq!(GeoCell::settle(at, far), GeoCell::of(far));
        assert_ne!(GeoCell::of(far), c);
    }

    proptest! {
        #[test]
        fn ids_round_trip_and_cells_hold_their_points(lat in -90.0..=90.0f64, lon in -180.0..=180.0f64) {
            let pt = p(lat, lon);
            let c = GeoCell::of(pt);
            prop_assert_eq!(GeoCell::from_id(c.id()), Some(c));
            prop_assert!(c.id() < 1 << 25);
            prop_assert!(c.holds_with_margin(pt, 1e-9));
            prop_assert_eq!(GeoCell::of(c.centre()), c);
            // A point's cell is in the neighbourhood of every cell around it.
            for n in c.neighbourhood() {
                prop_assert!(n.neighbourhood().contains(&c));
            }
        }

        #[test]
        fn neighbours_are_adjacent_on_the_ground(lat in -85.0..85.0f64, lon in -180.0..=180.0f64) {
            let c = GeoCell::of(p(lat, lon));
            for n in c.neighbourhood() {
                // At most one cell diagonal away: 4.9 km × √2 at the equator.
                prop_assert!(c.centre().distance_m(n.centre()) < 7_000.0, "{:?} {:?}", c, n);
            }
        }
    }
}
