//! What the SQL user stores share. SQLite and PostgreSQL differ in
//! placeholders, column types, locking and the fastest bulk path; the rules
//! do not. Those are written here once:
//!
//! - the friendship transitions (request, accept, remove, sharing), as
//!   functions over [`EdgeTx`], the handful of statements a dialect writes
//!   for one open transaction;
//! - a bulk load's bookkeeping: matching the ids `RETURNING` gave back to the
//!   users asked for ([`ids_in_order`]), and the directed edge rows of a
//!   list of friendships ([`mutual_edges`]).
//!
//! A schema change to the friend graph is a change to [`EdgeTx`] and to the
//! functions here; each adapter then only spells its statements.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::HashMap;

use async_trait::async_trait;
use nearby_core::{FriendStatus, Grant, Precision, Share, UserId};
use nearby_ports::{BulkUser, FriendEntry, ShareChange, StoreError, StoreResult};

/// The statements of the friend graph, inside one transaction a dialect
/// opened (and will commit).
#[async_trait]
pub trait EdgeTx: Send {
    /// Locks the rows of users `a` and `b` until the end of the
    /// transaction, so that two requests crossing between the same pair
    /// apply one after the other (a store with one writer needs no lock).
    /// Returns how many of the two exist.
    async fn lock_pair(&mut self, a: UserId, b: UserId) -> StoreResult<usize>;
    /// `from`'s side of the relation with `to`.
    async fn edge_status(&mut self, from: UserId, to: UserId) -> StoreResult<Option<FriendStatus>>;
    /// Writes `from`'s side of the relation (a new edge shares by default;
    /// an existing edge keeps its sharing).
    async fn set_edge(&mut self, from: UserId, to: UserId, status: FriendStatus)
        -> StoreResult<()>;
    /// Deletes both sides of the relation between `a` and `b`.
    async fn delete_pair(&mut self, a: UserId, b: UserId) -> StoreResult<()>;
    /// What `from` grants `to`, if they are mutual friends.
    async fn sharing(&mut self, from: UserId, to: UserId) -> StoreResult<Option<Share>>;
    /// Stores what `from` grants `to`.
    async fn set_sharing(&mut self, from: UserId, to: UserId, share: Share) -> StoreResult<()>;
    /// Runs `sql`, whose one parameter `$1` is `user`'s id, and returns
    /// how many rows it changed.
    async fn execute_for(&mut self, sql: &str, user: UserId) -> StoreResult<u64>;
    /// Runs `sql`, whose one parameter `$1` is `user`'s id, and returns the
    /// ids it selects.
    async fn ids_for(&mut self, sql: &str, user: UserId) -> StoreResult<Vec<UserId>>;
}

/// `UserStore::request_friend`: `from` asks `to`, or accepts `to`'s
/// request. Returns the relation before, from `from`'s side.
pub async fn request_friend(
    tx: &mut dyn EdgeTx,
    from: UserId,
    to: UserId,
) -> StoreResult<Option<FriendStatus>> {
    if from == to {
        return Err(StoreError::Conflict("cannot befriend yourself".into()));
    }
    if tx.lock_pair(from, to).await? < 2 {
        return Err(StoreError::NotFound(format!("user {to}")));
    }
    let before = tx.edge_status(from, to).await?;
    let after = FriendStatus::after_request(before);
    if Some(after) != before {
        tx.set_edge(from, to, after).await?;
        tx.set_edge(to, from, after.mirrored()).await?;
    }
    Ok(before)
}

/// `UserStore::remove_friend`: removes the relation whatever its state.
/// Returns what it was, from `a`'s side.
pub async fn remove_friend(
    tx: &mut dyn EdgeTx,
    a: UserId,
    b: UserId,
) -> StoreResult<Option<FriendStatus>> {
    tx.lock_pair(a, b).await?;
    let before = tx.edge_status(a, b).await?;
    tx.delete_pair(a, b).await?;
    Ok(before)
}

/// `UserStore::set_sharing`: changes what `from` grants friend `to`.
/// Returns the grant before and after; `NotFound` unless they are mutual
/// friends.
pub async fn set_sharing(
    tx: &mut dyn EdgeTx,
    from: UserId,
    to: UserId,
    change: ShareChange,
) -> StoreResult<(Share, Share)> {
    let Some(before) = tx.sharing(from, to).await? else {
        return Err(StoreError::NotFound(format!("user {to} is not a friend")));
    };
    let after = changed(before, change);
    if after != before {
        tx.set_sharing(from, to, after).await?;
    }
    Ok((before, after))
}

/// The grant `change` makes of `before`: turning sharing off clears its
/// end; the precision stays unless given.
pub fn changed(before: Share, change: ShareChange) -> Share {
    Share {
        enabled: change.enabled,
        until_ms: change.until_ms.filter(|_| change.enabled),
        precision: change.precision.unwrap_or(before.precision),
    }
}

/// A grant as both dialects store it: the `sharing`, `share_until` (NULL:
/// no end) and `approximate` columns of the granting edge.
pub type ShareRow = (bool, Option<i64>, bool);

/// The grant of a [`ShareRow`].
pub fn share_of((enabled, until_ms, approximate): ShareRow) -> Share {
    Share {
        enabled,
        until_ms,
        precision: if approximate {
            Precision::Approximate
        } else {
            Precision::Precise
        },
    }
}

/// A row of `visible_friends`: the friend's id, and the `share_until` and
/// `approximate` of their grant.
pub fn grant_of((id, until_ms, approximate): (i64, Option<i64>, bool)) -> Grant {
    Grant {
        id: UserId(id),
        until_ms,
        precision: share_of((true, until_ms, approximate)).precision,
    }
}

/// A row of `friends`: the other user's id, name and relation (in the
/// dialect's spelling, read by `status`), what the owner grants them, then
/// what they grant the owner.
pub type EntryRow<S> = (
    i64,
    String,
    S,
    bool,
    Option<i64>,
    bool,
    bool,
    Option<i64>,
    bool,
);

/// The [`FriendEntry`] of an [`EntryRow`].
pub fn entry_of<S>(
    (id, username, code, e1, u1, a1, e2, u2, a2): EntryRow<S>,
    status: impl Fn(S) -> StoreResult<FriendStatus>,
) -> StoreResult<FriendEntry> {
    Ok(FriendEntry {
        id: UserId(id),
        username,
        status: status(code)?,
        sharing: share_of((e1, u1, a1)),
        shares_with_me: share_of((e2, u2, a2)),
    })
}

/// `UserStore::delete_user`: the account, its tokens and both sides of
/// every relation (see [`DELETE_USER`]). Returns the users it had a
/// relation with; `NotFound` if there is no such user.
pub async fn delete_user(tx: &mut dyn EdgeTx, user: UserId) -> StoreResult<Vec<UserId>> {
    let [related, rest @ .., row] = DELETE_USER;
    let others = tx.ids_for(related, user).await?;
    for sql in rest {
        tx.execute_for(sql, user).await?;
    }
    if tx.execute_for(row, user).await? == 0 {
        return Err(StoreError::NotFound(format!("user {user}")));
    }
    Ok(others)
}

/// `UserStore::delete_user`, as statements both dialects read (`$1` is the
/// user's id; SQLite takes `$1` as a named parameter bound first): the
/// first lists the users related to them, the rest delete the other side
/// of each relation by its primary key (edges come in pairs), the user's
/// own side, their tokens, and (last, its row count telling whether the
/// user existed) their row. Run them in one transaction.
pub const DELETE_USER: [&str; 5] = [
    "SELECT friend_id FROM friend_edges WHERE user_id = $1",
    "DELETE FROM friend_edges WHERE friend_id = $1 AND user_id IN
       (SELECT friend_id FROM friend_edges WHERE user_id = $1)",
    "DELETE FROM friend_edges WHERE user_id = $1",
    "DELETE FROM tokens WHERE user_id = $1",
    "DELETE FROM users WHERE id = $1",
];

/// The ids of `users`, in their order, from the `(id, username)` rows an
/// `INSERT … RETURNING` gave back in no promised order.
pub fn ids_in_order(
    users: &[BulkUser],
    returned: impl IntoIterator<Item = (i64, String)>,
) -> StoreResult<Vec<UserId>> {
    let by_name: HashMap<String, i64> = returned.into_iter().map(|(id, n)| (n, id)).collect();
    users
        .iter()
        .map(|u| {
            by_name
                .get(&u.username)
                .map(|id| UserId(*id))
                .ok_or_else(|| StoreError::Invalid(format!("no id returned for {:?}", u.username)))
        })
        .collect()
}

/// The directed edge rows of `friendships` (indexes into `ids`): both ways,
/// without self-pairs or duplicates, in primary-key order (so a B-tree is
/// appended to, not split). `NotFound` if an index names no user.
pub fn mutual_edges(
    ids: &[UserId],
    friendships: &[(u32, u32)],
) -> StoreResult<Vec<(UserId, UserId)>> {
    let mut edges = Vec::with_capacity(friendships.len() * 2);
    for &(a, b) in friendships {
        let (Some(x), Some(y)) = (ids.get(a as usize), ids.get(b as usize)) else {
            return Err(StoreError::NotFound(format!(
                "friendship ({a}, {b}) names no user"
            )));
        };
        if x != y {
            edges.extend([(*x, *y), (*y, *x)]);
        }
    }
    edges.sort_unstable();
    edges.dedup();
    Ok(edges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// The friend graph in memory, as the rules see it.
    #[derive(Default)]
    struct Graph {
        users: BTreeSet<UserId>,
        edges: BTreeMap<(UserId, UserId), (FriendStatus, Share)>,
    }

    #[async_trait]
    impl EdgeTx for Graph {
        async fn lock_pair(&mut self, a: UserId, b: UserId) -> StoreResult<usize> {
            Ok([a, b].iter().filter(|u| self.users.contains(u)).count())
        }
        async fn edge_status(&mut self, f: UserId, t: UserId) -> StoreResult<Option<FriendStatus>> {
            Ok(self.edges.get(&(f, t)).map(|e| e.0))
        }
        async fn set_edge(&mut self, f: UserId, t: UserId, s: FriendStatus) -> StoreResult<()> {
            self.edges.entry((f, t)).or_insert((s, Share::DEFAULT)).0 = s;
            Ok(())
        }
        async fn delete_pair(&mut self, a: UserId, b: UserId) -> StoreResult<()> {
            self.edges.remove(&(a, b));
            self.edges.remove(&(b, a));
            Ok(())
        }
        async fn sharing(&mut self, f: UserId, t: UserId) -> StoreResult<Option<Share>> {
            Ok(self
                .edges
                .get(&(f, t))
                .filter(|e| e.0 == FriendStatus::Friends)
                .map(|e| e.1))
        }
        async fn set_sharing(&mut self, f: UserId, t: UserId, share: Share) -> StoreResult<()> {
            if let Some(e) = self.edges.get_mut(&(f, t)) {
                e.1 = share;
            }
            Ok(())
        }
        // The model runs no SQL: account deletion is tested on the real
        // stores (nearby-conformance).
        async fn execute_for(&mut self, _: &str, _: UserId) -> StoreResult<u64> {
            Err(StoreError::Invalid("the model runs no SQL".into()))
        }
        async fn ids_for(&mut self, _: &str, _: UserId) -> StoreResult<Vec<UserId>> {
            Err(StoreError::Invalid("the model runs no SQL".into()))
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Request(i64, i64),
        Remove(i64, i64),
        Share(i64, i64, ShareChange),
    }

    fn change() -> impl Strategy<Value = ShareChange> {
        let precision = prop_oneof![
            Just(None),
            Just(Some(nearby_core::Precision::Precise)),
            Just(Some(nearby_core::Precision::Approximate)),
        ];
        (any::<bool>(), proptest::option::of(0i64..100), precision).prop_map(
            |(enabled, until_ms, precision)| ShareChange {
                enabled,
                until_ms,
                precision,
            },
        )
    }

    fn op() -> impl Strategy<Value = Op> {
        let u = 1i64..5; // user 4 does not exist
        prop_oneof![
            (u.clone(), u.clone()).prop_map(|(a, b)| Op::Request(a, b)),
            (u.clone(), u.clone()).prop_map(|(a, b)| Op::Remove(a, b)),
            (u.clone(), u, change()).prop_map(|(a, b, c)| Op::Share(a, b, c)),
        ]
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    proptest! {
        /// Whatever happens, the two sides of a relation mirror each other,
        /// nobody befriends themselves or an unknown user, and sharing is
        /// only set between mutual friends.
        #[test]
        fn both_sides_always_agree(ops in proptest::collection::vec(op(), 0..40)) {
            block_on(async {
                let mut g = Graph { users: (1..4).map(UserId).collect(), ..Graph::default() };
                for op in ops {
                    match op {
                        Op::Request(a, b) => {
                            let r = request_friend(&mut g, UserId(a), UserId(b)).await;
                            if a == b {
                                prop_assert!(matches!(r, Err(StoreError::Conflict(_))));
                            } else if b == 4 || a == 4 {
                                prop_assert!(matches!(r, Err(StoreError::NotFound(_))));
                            } else {
                                let before = r.map_err(|e| TestCaseError::fail(e.to_string()))?;
                                let now = g.edges.get(&(UserId(a), UserId(b))).map(|e| e.0);
                                prop_assert_eq!(now, Some(FriendStatus::after_request(before)));
                            }
                        }
                        Op::Remove(a, b) => {
                            prop_assert!(remove_friend(&mut g, UserId(a), UserId(b)).await.is_ok());
                            prop_assert!(!g.edges.contains_key(&(UserId(a), UserId(b))));
                        }
                        Op::Share(a, b, change) => {
                            let key = (UserId(a), UserId(b));
                            let friends = g.edges.get(&key)
                                .is_some_and(|e| e.0 == FriendStatus::Friends);
                            let r = set_sharing(&mut g, UserId(a), UserId(b), change).await;
                            prop_assert_eq!(r.is_ok(), friends);
                            if let Ok((before, after)) = r {
                                prop_assert_eq!(g.edges.get(&key).map(|e| e.1), Some(after));
                                prop_assert_eq!(after.enabled, change.enabled);
                                // An end only while on; the precision kept unless given.
                                prop_assert!(after.enabled || after.until_ms.is_none());
                                prop_assert_eq!(after.precision, change.precision.unwrap_or(before.precision));
                            }
                        }
                    }
                    for (&(x, y), &(s, _)) in &g.edges {
                        prop_assert_ne!(x, y);
                        prop_assert_eq!(g.edges.get(&(y, x)).map(|e| e.0), Some(s.mirrored()));
                    }
                }
                Ok(())
            })?;
        }

        #[test]
        fn edges_are_mutual_sorted_and_unique(
            pairs in proptest::collection::vec((0u32..6, 0u32..6), 0..30),
        ) {
            let ids: Vec<UserId> = (10..16).map(UserId).collect();
            let edges = mutual_edges(&ids, &pairs).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(edges.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates");
            for &(a, b) in &edges {
                prop_assert_ne!(a, b);
                prop_assert!(edges.binary_search(&(b, a)).is_ok());
            }
            for &(a, b) in &pairs {
                if a != b {
                    prop_assert!(edges.binary_search(&(ids[a as usize], ids[b as usize])).is_ok());
                }
            }
        }
    }

    #[test]
    fn an_index_past_the_users_is_not_found() {
        let ids = [UserId(1), UserId(2)];
        assert!(matches!(
            mutual_edges(&ids, &[(0, 2)]),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn ids_come_back_in_the_order_asked_or_not_at_all() {
        let user = |n: &str| BulkUser {
            username: n.into(),
            password_hash: String::new(),
            token_hash: [0; 32],
            token_expires_at_ms: 0,
        };
        let users = [user("a"), user("b"), user("c")];
        let rows = vec![(7, "c".to_string()), (5, "a".into()), (6, "b".into())];
        let ids = ids_in_order(&users, rows).expect("all returned");
        assert_eq!(ids, [UserId(5), UserId(6), UserId(7)]);
        let missing = ids_in_order(&users, vec![(5, "a".to_string())]);
        assert!(matches!(missing, Err(StoreError::Invalid(_))));
    }
}
