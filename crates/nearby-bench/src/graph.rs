//! The friend graph, over users `0..n` split into contiguous city blocks.
//! Two seeded, reproducible models:
//!
//! - [`Graph::small_world`] (Watts–Strogatz): a ring lattice where each user
//!   knows their `k` nearest neighbours, each edge rewired to a random user
//!   with probability `p`. Clustered, but every degree is about `k`.
//! - [`Graph::clustered_power_law`] (Holme–Kim): inside each city, users
//!   arrive one by one and make `k / 2` friendships each, by preferential
//!   attachment (popular users gain friends faster, so degrees are
//!   heavy-tailed) or, with probability `triad`, with a friend of the user
//!   they just befriended (closing triangles, so it is clustered). A share
//!   `p` of the friendships go to a random user anywhere instead (friends in
//!   other cities). Nobody gets more than `cap` friends.

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
        Self::sorted(adj)
    }

    /// Holme–Kim inside each block of `cities` (sizes, summing to the user
    /// count), `k / 2` friendships made per arriving user, triad formation
    /// with probability `triad`, a share `p` of friendships to a random user
    /// anywhere, and at most `cap` friends per user.
    pub fn clustered_power_law(
        cities: &[usize],
        k: usize,
        triad: f64,
        p: f64,
        cap: usize,
        seed: u64,
    ) -> Self {
        let n: usize = cities.iter().sum();
        let mut rng = StdRng::seed_from_u64(seed);
        let m = (k / 2).max(1);
        let mut adj: Vec<Vec<u32>> = vec![Vec::new(); n];
        // mark[v] == u: v is already u's friend (or u itself), in u's turn.
        let mut mark = vec![u32::MAX; n];
        // Each local friendship's two ends: a uniform pick from this list is
        // a degree-proportional pick of a user.
        let mut ends: Vec<u32> = Vec::new();
        let mut start = 0usize;
        for &size in cities {
            ends.clear();
            let seeds = size.min(m + 1);
            for u in start..start + size {
                let uu = u as u32;
                mark[u] = uu;
                for v in &adj[u] {
                    mark[*v as usize] = uu;
                }
                // The first users of a city know each other.
                let picks = if u < start + seeds { u - start } else { m };
                let mut last: Option<u32> = None;
                for i in 0..picks {
                    if adj[u].len() >= cap {
                        break;
                    }
                    let ok = |v: u32, adj: &[Vec<u32>], mark: &[u32]| {
                        mark[v as usize] != uu && adj[v as usize].len() < cap
                    };
                    let mut pick = None;
                    if u < start + seeds {
                        let v = (start + i) as u32;
                        pick = ok(v, &adj, &mark).then_some(v);
                    } else if rng.gen::<f64>() < p {
                        pick = (0..16)
                            .map(|_| rng.gen_range(0..n as u32))
                            .find(|v| ok(*v, &adj, &mark));
                    } else {
                        if let Some(w) = last.filter(|_| rng.gen::<f64>() < triad) {
                            let friends = &adj[w as usize];
                            pick = (0..8)
                                .map(|_| friends[rng.gen_range(0..friends.len())])
                                .find(|v| ok(*v, &adj, &mark));
                        }
                        if pick.is_none() {
                            pick = (0..16)
                                .filter(|_| !ends.is_empty())
                                .map(|_| ends[rng.gen_range(0..ends.len())])
                                .find(|v| ok(*v, &adj, &mark));
                            last = pick;
                        }
                    }
                    let Some(v) = pick else { continue };
                    mark[v as usize] = uu;
                    adj[u].push(v);
                    adj[v as usize].push(uu);
                    let local = (start..start + size).contains(&(v as usize));
                    if local {
                        ends.extend([uu, v]);
                    }
                }
            }
            start += size;
        }
        Self::sorted(adj)
    }

    fn sorted(mut adj: Vec<Vec<u32>>) -> Self {
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

    /// Mean local clustering coefficient: for each user with two or more
    /// friends, the share of their friend pairs who are friends themselves.
    pub fn clustering(&self) -> f64 {
        let mut sum = 0.0;
        let mut counted = 0usize;
        for l in &self.adj {
            if l.len() < 2 {
                continue;
            }
            let mut closed = 0usize;
            for (i, a) in l.iter().enumerate() {
                for b in &l[i + 1..] {
                    if self.adj[*a as usize].binary_search(b).is_ok() {
                        closed += 1;
                    }
                }
            }
            sum += closed as f64 / (l.len() * (l.len() - 1) / 2) as f64;
            counted += 1;
        }
        if counted == 0 {
            0.0
        } else {
            sum / counted as f64
        }
    }
}

/// Splits `n` users over `k` cities with Zipf sizes (the i-th largest city
/// holds a share proportional to 1/i), the remainder going to the first.
pub fn city_sizes(n: usize, k: usize) -> Vec<usize> {
    let k = k.clamp(1, n.max(1));
    let total: f64 = (1..=k).map(|i| 1.0 / i as f64).sum();
    let mut sizes: Vec<usize> = (1..=k)
        .map(|i| ((n as f64) / (i as f64) / total).floor() as usize)
        .collect();
    let given: usize = sizes.iter().sum();
    sizes[0] += n - given;
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn assert_simple(g: &Graph) -> Result<(), TestCaseError> {
        for (u, l) in g.adj.iter().enumerate() {
            prop_assert!(!l.contains(&(u as u32)), "self loop");
            for v in l {
                prop_assert!(g.adj[*v as usize].contains(&(u as u32)), "asymmetric");
            }
            let mut d = l.clone();
            d.dedup();
            prop_assert_eq!(d.len(), l.len(), "duplicate edge");
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn symmetric_simple_and_degree_preserving(n in 3usize..200, k in 0usize..12, p in 0.0f64..1.0, seed in any::<u64>()) {
            let g = Graph::small_world(n, k, p, seed);
            let half = (k / 2).min((n - 1) / 2);
            assert_simple(&g)?;
            // Rewiring moves edges, never adds or removes them.
            let total: usize = g.adj.iter().map(Vec::len).sum();
            prop_assert_eq!(total, 2 * n * half);
            prop_assert_eq!(g.edges().count(), n * half);
        }

        #[test]
        fn the_same_seed_gives_the_same_graph(seed in any::<u64>()) {
            let a = Graph::small_world(100, 8, 0.2, seed);
            let b = Graph::small_world(100, 8, 0.2, seed);
            prop_assert_eq!(a.adj, b.adj);
            let sizes = city_sizes(300, 3);
            let a = Graph::clustered_power_law(&sizes, 8, 0.5, 0.1, 50, seed);
            let b = Graph::clustered_power_law(&sizes, 8, 0.5, 0.1, 50, seed);
            prop_assert_eq!(a.adj, b.adj);
        }

        #[test]
        fn power_law_is_simple_capped_and_at_most_m_per_arrival(
            n in 2usize..400, cities in 1usize..5, k in 0usize..16,
            triad in 0.0f64..1.0, p in 0.0f64..1.0, cap in 1usize..60, seed in any::<u64>(),
        ) {
            let sizes = city_sizes(n, cities);
            prop_assert_eq!(sizes.iter().sum::<usize>(), n);
            let g = Graph::clustered_power_law(&sizes, k, triad, p, cap, seed);
            prop_assert_eq!(g.adj.len(), n);
            assert_simple(&g)?;
            prop_assert!(g.adj.iter().all(|l| l.len() <= cap));
            prop_assert!(g.edges().count() <= n * (k / 2).max(1));
        }

        #[test]
        fn zipf_city_sizes_cover_everyone_largest_first(n in 1usize..100_000, k in 1usize..12) {
            let s = city_sizes(n, k);
            prop_assert_eq!(s.iter().sum::<usize>(), n);
            prop_assert!(s.windows(2).all(|w| w[0] >= w[1]));
        }
    }

    #[test]
    fn without_rewiring_it_is_a_ring_lattice() {
        let g = Graph::small_world(10, 4, 0.0, 1);
        assert_eq!(g.adj[0], vec![1, 2, 8, 9]);
    }

    #[test]
    fn power_law_degrees_are_heavy_tailed_and_clustered() {
        let (n, k) = (20_000, 20);
        let hk = Graph::clustered_power_law(&[n], k, 0.6, 0.0, 5000, 7);
        let ws = Graph::small_world(n, k, 0.1, 7);
        let mean = |g: &Graph| g.adj.iter().map(Vec::len).sum::<usize>() as f64 / n as f64;
        let max = |g: &Graph| g.adj.iter().map(Vec::len).max().unwrap_or(0);
        // The mean is as asked for (less the seed clique's shortfall).
        assert!((mean(&hk) - k as f64).abs() < 0.5, "mean {}", mean(&hk));
        // Preferential attachment: hubs; the lattice has none.
        assert!(max(&hk) as f64 > 10.0 * mean(&hk), "max {}", max(&hk));
        assert!((max(&ws) as f64) < 2.0 * mean(&ws), "max {}", max(&ws));
        // Triad formation: far above a random graph's k / n = 0.001.
        assert!(hk.clustering() > 0.05, "clustering {}", hk.clustering());
        // The cap holds.
        let capped = Graph::clustered_power_law(&[n], k, 0.6, 0.0, 100, 7);
        assert!(max(&capped) <= 100);
    }

    #[test]
    fn cross_city_friendships_are_the_asked_share() {
        let sizes = city_sizes(10_000, 4);
        let g = Graph::clustered_power_law(&sizes, 20, 0.5, 0.1, 5000, 3);
        let mut city = Vec::new();
        for (c, s) in sizes.iter().enumerate() {
            city.extend(std::iter::repeat_n(c, *s));
        }
        let edges: Vec<_> = g.edges().collect();
        let cross = edges
            .iter()
            .filter(|(a, b)| city[*a as usize] != city[*b as usize])
            .count() as f64
            / edges.len() as f64;
        // A random pick lands in another city about 60 % of the time here.
        assert!((0.03..0.1).contains(&cross), "cross-city share {cross}");
    }
}
