//! The friend graph: Watts–Strogatz small world (a ring lattice where each
//! user knows their `k` nearest neighbours, each edge rewired to a random
//! user with probability `p`): clustered like real friend circles, with a
//! few long links. Seeded, so a run is reproducible.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;

/// Undirected friendships over users `0..n`, as adjacency lists.
#[derive(Debug, Clone)]
pub struct Graph {
    /// `adj[u]`: u's friends, ascending.
    pub adj: Vec<Vec<u32>>,
}

impl Graph {
    /// `n` users, mean degree `k` (rounded down to even, capped at `n - 1`),
    /// rewiring probability `p`.
    pub fn small_world(n: usize, k: usize, p: f64, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let half = (k / 2).min(n.saturating_sub(1) / 2);
        // Ordered, so the rewiring visits edges in the same order every run.
        let mut edges: BTreeSet<(u32, u32)> = BTreeSet::new();
        let key = |a: usize, b: usize| (a.min(b) as u32, a.max(b) as u32);
        for i in 0..n {
            for j in 1..=half {
                edges.insert(key(i, (i + j) % n));
            }
        }
        if n > 2 * half + 1 {
            let lattice: Vec<(u32, u32)> = edges.iter().copied().collect();
            for (a, b) in lattice {
                if rng.gen::<f64>() >= p {
                    continue;
                }
                // Rewire (a, b) to (a, c) for a random c not yet linked to a.
                for _ in 0..16 {
                    let c = rng.gen_range(0..n);
                    let e = key(a as usize, c);
                    if c != a as usize && !edges.contains(&e) {
                        edges.remove(&(a, b));
                        edges.insert(e);
                        break;
                    }
                }
            }
        }
        let mut adj = vec![Vec::new(); n];
        for (a, b) in edges {
            adj[a as usize].push(b);
            adj[b as usize].push(a);
        }
        for l in &mut adj {
            l.sort_unstable();
        }
        Self { adj }
    }

    /// Every friendship once, `(a, b)` with `a < b`.
    pub fn edges(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.adj.iter().enumerate().flat_map(|(a, l)| {
            l.iter()
                .filter(move |b| **b > a as u32)
                .map(move |b| (a as u32, *b))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn symmetric_simple_and_degree_preserving(n in 3usize..200, k in 0usize..12, p in 0.0f64..1.0, seed in any::<u64>()) {
            let g = Graph::small_world(n, k, p, seed);
            let half = (k / 2).min((n - 1) / 2);
            let mut total = 0;
            for (u, l) in g.adj.iter().enumerate() {
                total += l.len();
                prop_assert!(!l.contains(&(u as u32)), "self loop");
                for v in l {
                    prop_assert!(g.adj[*v as usize].contains(&(u as u32)), "asymmetric");
                }
                let mut d = l.clone();
                d.dedup();
                prop_assert_eq!(d.len(), l.len(), "duplicate edge");
            }
            // Rewiring moves edges, never adds or removes them.
            prop_assert_eq!(total, 2 * n * half);
            prop_assert_eq!(g.edges().count(), n * half);
        }

        #[test]
        fn the_same_seed_gives_the_same_graph(seed in any::<u64>()) {
            let a = Graph::small_world(100, 8, 0.2, seed);
            let b = Graph::small_world(100, 8, 0.2, seed);
            prop_assert_eq!(a.adj, b.adj);
        }
    }

    #[test]
    fn without_rewiring_it_is_a_ring_lattice() {
        let g = Graph::small_world(10, 4, 0.0, 1);
        assert_eq!(g.adj[0], vec![1, 2, 8, 9]);
    }
}
