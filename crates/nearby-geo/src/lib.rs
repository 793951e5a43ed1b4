//! Geo maths for `nearby`: a validated coordinate type and the great-circle
//! distance between two of them.
//!
//! Distances use the haversine formula on a sphere of the IUGG mean Earth
//! radius. Against the WGS-84 ellipsoid it errs by at most ~0.5 %, i.e. ~40 m
//! at the default 8 km radius: far below GPS noise on a phone, and the
//! formula costs a few tens of nanoseconds, which matters on the fan-out path
//! where every delivery computes one distance.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod geohash;

pub use geohash::GeoCell;

/// Mean Earth radius (IUGG), in metres.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// Why a coordinate pair was rejected.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum CoordError {
    /// Latitude outside [-90, 90] or not a finite number.
    #[error("latitude {0} is out of range [-90, 90]")]
    Latitude(f64),
    /// Longitude outside [-180, 180] or not a finite number.
    #[error("longitude {0} is out of range [-180, 180]")]
    Longitude(f64),
}

/// A point on Earth in decimal degrees, known to be in range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    lat: f64,
    lon: f64,
}

impl Point {
    /// Validates and builds a point. NaN and infinities are rejected as out of
    /// range, so every `Point` is safe to feed to the distance maths.
    pub fn new(lat: f64, lon: f64) -> Result<Self, CoordError> {
        if !(-90.0..=90.0).contains(&lat) {
            return Err(CoordError::Latitude(lat));
        }
        if !(-180.0..=180.0).contains(&lon) {
            return Err(CoordError::Longitude(lon));
        }
        Ok(Self { lat, lon })
    }

    /// Latitude in degrees.
    pub fn lat(self) -> f64 {
        self.lat
    }

    /// Longitude in degrees.
    pub fn lon(self) -> f64 {
        self.lon
    }

    /// Great-circle distance to `other`, in metres.
    pub fn distance_m(self, other: Point) -> f64 {
        haversine_m(self.lat, self.lon, other.lat, other.lon)
    }

    /// Initial great-circle bearing towards `other`, degrees clockwise from
    /// true north in `[0, 360)`; 0 when the points coincide.
    pub fn bearing_deg(self, other: Point) -> f64 {
        let (p1, p2) = (self.lat.to_radians(), other.lat.to_radians());
        let dl = (other.lon - self.lon).to_radians();
        let y = dl.sin() * p2.cos();
        let x = p1.cos() * p2.sin() - p1.sin() * p2.cos() * dl.cos();
        if y == 0.0 && x == 0.0 {
            return 0.0;
        }
        let b = y.atan2(x).to_degrees().rem_euclid(360.0);
        // rem_euclid can round up to exactly 360.0 for tiny negative angles.
        if b >= 360.0 {
            0.0
        } else {
            b
        }
    }
}

/// Side of an approximate-location cell, in degrees of latitude (about
/// 3.3 km).
pub const CELL_DEG: f64 = 0.03;

impl Point {
    /// The centre of the cell of about [`CELL_DEG`] × [`CELL_DEG`] (3.3 km
    /// square) that holds this point, on a grid of latitude rows each cut
    /// into as many columns as fit its circumference: cells stay about
    /// square from the equator to the poles (a plain lat/lon grid narrows to
    /// nothing there). Every point of a cell gives the same centre, which
    /// is all an approximate viewer may ever learn.
    pub fn cell_centre(self) -> Point {
        let rows = (180.0 / CELL_DEG).round();
        let row = ((self.lat + 90.0) / CELL_DEG)
            .floor()
            .clamp(0.0, rows - 1.0);
        let lat = -90.0 + (row + 0.5) * CELL_DEG;
        let width = lat.to_radians().cos() * 360.0;
        let cols = (width / CELL_DEG).floor().max(1.0);
        let step = 360.0 / cols;
        let col = ((self.lon + 180.0) / step).floor().clamp(0.0, cols - 1.0);
        Point {
            lat,
            lon: -180.0 + (col + 0.5) * step,
        }
    }
}

/// Haversine great-circle distance between two coordinates in degrees, in
/// metres. Inputs are expected in range (see [`Point::new`]).
pub fn haversine_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let a = (dp * 0.5).sin().powi(2) + p1.cos() * p2.cos() * (dl * 0.5).sin().powi(2);
    // Rounding can push `a` a hair above 1 for antipodal points; clamp so
    // `asin` never sees an out-of-domain value and returns NaN.
    2.0 * EARTH_RADIUS_M * a.clamp(0.0, 1.0).sqrt().asin()
}

#[cfg(test)]
mod bearing_tests {
    use super::*;
    use proptest::prelude::*;

    fn p(lat: f64, lon: f64) -> Point {
        Point::new(lat, lon).unwrap()
    }

    #[test]
    fn cardinal_directions() {
        let o = p(0.0, 0.0);
        assert!((o.bearing_deg(p(1.0, 0.0)) - 0.0).abs() < 1e-9);
        assert!((o.bearing_deg(p(0.0, 1.0)) - 90.0).abs() < 1e-9);
        assert!((o.bearing_deg(p(-1.0, 0.0)) - 180.0).abs() < 1e-9);
        assert!((o.bearing_deg(p(0.0, -1.0)) - 270.0).abs() < 1e-9);
        assert_eq!(o.bearing_deg(o), 0.0);
    }

    proptest! {
        #[test]
        fn always_in_range(a in -90.0..=90.0f64, b in -180.0..=180.0f64, c in -90.0..=90.0f64, d in -180.0..=180.0f64) {
            let x = p(a, b).bearing_deg(p(c, d));
            prop_assert!((0.0..360.0).contains(&x), "{x}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(lat: f64, lon: f64) -> Point {
        Point::new(lat, lon).unwrap()
    }

    #[test]
    fn rejects_out_of_range_and_non_finite() {
        assert_eq!(Point::new(90.1, 0.0), Err(CoordError::Latitude(90.1)));
        assert_eq!(Point::new(0.0, -180.5), Err(CoordError::Longitude(-180.5)));
        assert!(Point::new(f64::NAN, 0.0).is_err());
        assert!(Point::new(0.0, f64::INFINITY).is_err());
        assert!(Point::new(90.0, 180.0).is_ok());
        assert!(Point::new(-90.0, -180.0).is_ok());
    }

    #[test]
    fn known_distances() {
        // Paris (Notre-Dame) to London (St Paul's): ~343.5 km by great circle.
        let d = p(48.853, 2.3499).distance_m(p(51.5138, -0.0984));
        assert!((d - 343_500.0).abs() < 1_500.0, "{d}");
        // One degree of latitude is ~111.2 km on the mean sphere.
        let d = p(0.0, 0.0).distance_m(p(1.0, 0.0));
        assert!((d - 111_195.0).abs() < 5.0, "{d}");
        // Antipodes: half the circumference, no NaN.
        let d = p(0.0, 0.0).distance_m(p(0.0, 180.0));
        assert!(
            (d - std::f64::consts::PI * EARTH_RADIUS_M).abs() < 1.0,
            "{d}"
        );
    }

    fn point() -> impl Strategy<Value = Point> {
        (-90.0f64..=90.0, -180.0f64..=180.0).prop_map(|(lat, lon)| p(lat, lon))
    }

    proptest! {
        #[test]
        fn distance_is_a_metric(a in point(), b in point(), c in point()) {
            let ab = a.distance_m(b);
            prop_assert!(ab.is_finite() && ab >= 0.0);
            prop_assert!(ab <= std::f64::consts::PI * EARTH_RADIUS_M + 1e-6);
            prop_assert!(a.distance_m(a) < 1e-6);
            prop_assert!((ab - b.distance_m(a)).abs() < 1e-6);
            // Triangle inequality, with slack for floating-point rounding.
            prop_assert!(a.distance_m(c) <= ab + b.distance_m(c) + 1e-3);
        }

        #[test]
        fn same_longitude_distance_is_arc_of_latitude(lat1 in -90.0f64..=90.0, lat2 in -90.0f64..=90.0, lon in -180.0f64..=180.0) {
            let d = p(lat1, lon).distance_m(p(lat2, lon));
            let expected = (lat1 - lat2).abs().to_radians() * EARTH_RADIUS_M;
            prop_assert!((d - expected).abs() < 1e-3 * expected.max(1.0), "{} vs {}", d, expected);
        }

        #[test]
        fn validation_accepts_exactly_the_range(lat in proptest::num::f64::ANY, lon in proptest::num::f64::ANY) {
            let ok = (-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon);
            prop_assert_eq!(Point::new(lat, lon).is_ok(), ok);
        }
    }
}

#[cfg(test)]
mod cell_tests {
    use super::*;
    use proptest::prelude::*;

    fn p(lat: f64, lon: f64) -> Point {
        Point::new(lat, lon).unwrap()
    }

    #[test]
    fn cells_are_about_three_kilometres_everywhere() {
        for lat in [0.0, 37.5, 60.0, 80.0] {
            let c = p(lat, 10.0).cell_centre();
            // The next cell north and east have other centres about 3.3 km away.
            let north = p(c.lat() + CELL_DEG, c.lon()).cell_centre();
            let east_step = CELL_DEG / c.lat().to_radians().cos();
            let east = p(c.lat(), c.lon() + east_step * 1.01).cell_centre();
            for (name, other) in [("north", north), ("east", east)] {
                let d = c.distance_m(other);
                assert!((3000.0..3700.0).contains(&d), "{name} of {lat}: {d} m");
            }
        }
    }

    proptest! {
        #[test]
        fn a_centre_is_near_its_point_and_its_own_centre(lat in -90.0..=90.0f64, lon in -180.0..=180.0f64) {
            let pt = p(lat, lon);
            let c = pt.cell_centre();
            prop_assert!(Point::new(c.lat(), c.lon()).is_ok());
            // Half the diagonal of a 3.3 km square, with room for the
            // polar caps' rounding of the column count.
            if lat.abs() < 89.0 {
                prop_assert!(pt.distance_m(c) < 2_500.0, "{} m", pt.distance_m(c));
            }
            prop_assert_eq!(c.cell_centre(), c);
        }

        #[test]
        fn nearby_points_of_a_cell_share_its_centre(lat in -85.0..85.0f64, lon in -179.0..179.0f64, dlat in 0.0..1.0f64, dlon in 0.0..1.0f64) {
            // Any point between a cell's corners snaps to the same centre.
            let c = p(lat, lon).cell_centre();
            let half_lon = {
                let cols = (c.lat().to_radians().cos() * 360.0 / CELL_DEG).floor().max(1.0);
                180.0 / cols
            };
            let inside = p(
                c.lat() + (dlat - 0.5) * CELL_DEG * 0.999,
                c.lon() + (dlon - 0.5) * 2.0 * half_lon * 0.999,
            );
            prop_assert_eq!(inside.cell_centre(), c);
        }
    }
}
