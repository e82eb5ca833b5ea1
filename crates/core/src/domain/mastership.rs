//! Mastership: which replica may change an item (DOMAIN.md section 1).
//!
//! Every record, workspace item (saved query, report, chart) and user record has
//! one master replica, at first the one where it was created. Anywhere the item can
//! be read and printed; only at its master can it be changed.
//!
//! Each replica judges by its own view of the item ([`ItemView`]). A move is made
//! by the current master and carried to the new master in a packet. The old master
//! records the item as in transit and refuses changes; the new master still sees
//! the old one until it imports the move, so it refuses too. Nobody can change the
//! item in between, and there are never two masters.
//!
//! Every move carries a move count. A replica applies a move only if it is newer
//! than its view, so packets that arrive late, twice or out of order cannot bring
//! back an old master.
//!
//! A workspace item follows the ordinary rule: it is changed at its master, whoever
//! owns it, and an item without an owner too. A few tasks of a user's own are only
//! allowed while logged in at the replica that masters that user's record ([`UserTask`],
//! the vendor's list: changing one's user profile, saving query defaults, assigning
//! startup queries, adding favourites). Moving a user record's mastership carries
//! along the workspace items that user created and that the same replica masters.
//!
//! A forced takeover, for a master that is gone for good, needs an explicit force
//! request and a master known to be removed; an unreachable replica may still be
//! alive, and taking over from it could leave two masters.

use std::fmt;
use thiserror::Error;

/// What an item is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "camelCase")]
pub enum ItemKind {
    Record,
    /// A saved query, report or chart, owned by the user who created it.
    WorkspaceItem,
    /// The record describing a user.
    User,
}

impl fmt::Display for ItemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ItemKind::Record => "record",
            ItemKind::WorkspaceItem => "workspace item",
            ItemKind::User => "user record",
        })
    }
}

/// Where one replica believes an item is mastered.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Master {
    At(String),
    /// Seen only at the old master: it moved the item away and has not yet learnt
    /// that `to` imported the move.
    InTransit {
        from: String,
        to: String,
    },
}

impl Master {
    /// The replica that masters the item, or will once the move is imported.
    pub fn replica(&self) -> &str {
        match self {
            Master::At(replica) => replica,
            Master::InTransit { to, .. } => to,
        }
    }

    /// Whether `replica` masters the item now.
    pub fn is_at(&self, replica: &str) -> bool {
        matches!(self, Master::At(master) if master == replica)
    }
}

impl fmt::Display for Master {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Master::At(replica) => write!(f, "replica {replica}"),
            Master::InTransit { from, to } => {
                write!(f, "replica {to} (moving there from replica {from})")
            }
        }
    }
}

/// One replica's view of an item's mastership.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ItemView {
    pub id: String,
    pub kind: ItemKind,
    pub master: Master,
    /// How many mastership moves this view reflects.
    pub moves: u64,
    /// For workspace items: the user who created it.
    pub creator: Option<String>,
}

impl ItemView {
    /// A new item, mastered where it was created.
    pub fn created(id: &str, kind: ItemKind, at: &str, creator: Option<&str>) -> Self {
        ItemView {
            id: id.to_owned(),
            kind,
            master: Master::At(at.to_owned()),
            moves: 0,
            creator: creator.map(str::to_owned),
        }
    }

    /// Applies a move received in a packet. Returns whether the view changed: a
    /// move for another item, or one this view already reflects, is ignored.
    pub fn import_move(&mut self, movement: &MastershipMove) -> bool {
        if movement.item != self.id || movement.moves <= self.moves {
            return false;
        }
        self.master = Master::At(movement.to.clone());
        self.moves = movement.moves;
        true
    }

    /// At the old master: the new master reported that it imported `movement`.
    pub fn move_imported(&mut self, movement: &MastershipMove) {
        let in_transit = matches!(&self.master, Master::InTransit { from, to }
            if *from == movement.from && *to == movement.to);
        if in_transit && movement.item == self.id && movement.moves == self.moves {
            self.master = Master::At(movement.to.clone());
        }
    }

    fn describe(&self) -> (ItemKind, String) {
        (self.kind, self.id.clone())
    }
}

/// The user acting at this replica, with this replica's view of where their user
/// record is mastered.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ActorView {
    pub user: String,
    pub user_master: Master,
}

/// What is known of a replica that masters an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaStatus {
    Alive,
    /// Not answering; it may still be alive and changing items.
    Unreachable,
    /// Gone for good, known to the fleet as removed.
    Removed,
}

impl fmt::Display for ReplicaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReplicaStatus::Alive => "alive",
            ReplicaStatus::Unreachable => "unreachable",
            ReplicaStatus::Removed => "removed",
        })
    }
}

/// What someone wants to do with an item.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Operation {
    Read,
    Print,
    Modify,
    ChangeState,
    Delete,
    Rename,
    Edit,
    /// Move a workspace item to another folder.
    Move,
    MoveMastership {
        to: String,
    },
    /// Take mastership from a master that is gone for good. `master_status` is what
    /// the fleet knows of the replica that masters the item.
    TakeOver {
        force: bool,
        master_status: ReplicaStatus,
    },
    /// A task of the logged-in user's own, about the item (a query made the user's
    /// default or startup query, an item added to the user's favourites): it reads the
    /// item and changes what the user's record holds.
    UserTask(UserTask),
}

/// The tasks only allowed while logged in at the replica that masters one's own user
/// record (the vendor's list).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UserTask {
    ChangeProfile,
    SaveQueryDefaults,
    AssignStartupQueries,
    AddFavourite,
}

impl fmt::Display for UserTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UserTask::ChangeProfile => "changing your user profile",
            UserTask::SaveQueryDefaults => "saving query defaults",
            UserTask::AssignStartupQueries => "assigning startup queries",
            UserTask::AddFavourite => "adding favourites",
        })
    }
}

impl Operation {
    /// Whether the operation only looks at the item.
    pub fn is_read(&self) -> bool {
        matches!(self, Operation::Read | Operation::Print)
    }
}

/// A mastership move, carried to the other replicas in a packet.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MastershipMove {
    pub item: String,
    pub from: String,
    pub to: String,
    /// The item's move count after this move.
    pub moves: u64,
    /// Made by a forced takeover rather than by the master.
    pub forced: bool,
}

/// Why an operation is refused. Each message names the master replica concerned.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    #[error(
        "{kind} {item} is mastered at replica {master}; change it there or move its mastership here"
    )]
    RemoteMaster {
        kind: ItemKind,
        item: String,
        master: String,
    },
    #[error(
        "{kind} {item} is moving from replica {from} to replica {to}; nobody can change it until replica {to} has imported the move"
    )]
    InTransit {
        kind: ItemKind,
        item: String,
        from: String,
        to: String,
    },
    #[error("{task} needs a logged-in user")]
    NoUser { task: UserTask },
    #[error("the user record of {user} is mastered at {master}; log in there for {task}")]
    UserMasteredElsewhere {
        user: String,
        master: Master,
        task: UserTask,
    },
    #[error("{kind} {item} is already mastered at replica {master}")]
    AlreadyMastered {
        kind: ItemKind,
        item: String,
        master: String,
    },
    #[error(
        "taking over mastership of {kind} {item} from replica {master} needs an explicit force request"
    )]
    TakeoverNotForced {
        kind: ItemKind,
        item: String,
        master: String,
    },
    #[error(
        "replica {master}, master of {kind} {item}, is {status}, not removed; taking over from it could leave two masters"
    )]
    MasterNotRemoved {
        kind: ItemKind,
        item: String,
        master: String,
        status: ReplicaStatus,
    },
}

/// Whether `op` on `item` is allowed at replica `here`, judged by this replica's
/// view. `actor` is the user logged in here, if any; workspace item changes need one.
pub fn check(
    op: &Operation,
    item: &ItemView,
    here: &str,
    actor: Option<&ActorView>,
) -> Result<(), Refusal> {
    let (kind, id) = item.describe();
    if op.is_read() {
        return Ok(());
    }
    if let Operation::UserTask(task) = op {
        return check_user_task(*task, here, actor);
    }
    if let Operation::TakeOver {
        force,
        master_status,
    } = op
    {
        return check_takeover(item, here, *force, *master_status);
    }
    match &item.master {
        Master::InTransit { from, to } => {
            return Err(Refusal::InTransit {
                kind,
                item: id,
                from: from.clone(),
                to: to.clone(),
            });
        }
        Master::At(master) if master != here => {
            return Err(Refusal::RemoteMaster {
                kind,
                item: id,
                master: master.clone(),
            });
        }
        Master::At(_) => {}
    }
    if let Operation::MoveMastership { to } = op
        && to == here
    {
        return Err(Refusal::AlreadyMastered {
            kind,
            item: id,
            master: here.to_owned(),
        });
    }
    Ok(())
}

/// Whether `op`, a change at `here` that also moves the item's mastership to `to` (a
/// mastership field set in an ordinary action, as the vendor allows at the master), is
/// allowed: only where the change and the move both are, so at the master, to another
/// replica. Change and move then travel in one packet, the move made by the master.
pub fn check_change_with_move(
    op: &Operation,
    item: &ItemView,
    here: &str,
    to: &str,
    actor: Option<&ActorView>,
) -> Result<(), Refusal> {
    check(op, item, here, actor)?;
    check(
        &Operation::MoveMastership { to: to.to_owned() },
        item,
        here,
        actor,
    )
}

/// A user's own task: allowed where that user's record is mastered, whatever the item.
fn check_user_task(task: UserTask, here: &str, actor: Option<&ActorView>) -> Result<(), Refusal> {
    let Some(actor) = actor else {
        return Err(Refusal::NoUser { task });
    };
    if actor.user_master.is_at(here) {
        Ok(())
    } else {
        Err(Refusal::UserMasteredElsewhere {
            user: actor.user.clone(),
            master: actor.user_master.clone(),
            task,
        })
    }
}

fn check_takeover(
    item: &ItemView,
    here: &str,
    force: bool,
    master_status: ReplicaStatus,
) -> Result<(), Refusal> {
    let (kind, id) = item.describe();
    let master = item.master.replica().to_owned();
    if item.master.is_at(here) {
        Err(Refusal::AlreadyMastered {
            kind,
            item: id,
            master,
        })
    } else if !force {
        Err(Refusal::TakeoverNotForced {
            kind,
            item: id,
            master,
        })
    } else if master_status != ReplicaStatus::Removed {
        Err(Refusal::MasterNotRemoved {
            kind,
            item: id,
            master,
            status: master_status,
        })
    } else {
        Ok(())
    }
}

/// Moves mastership of `item` from `here` to `to`, if allowed. The local view
/// becomes in transit; the returned move goes to the other replicas in a packet.
/// For a user record, use [`move_user_mastership`] so their workspace items follow.
pub fn move_mastership(
    item: &mut ItemView,
    here: &str,
    to: &str,
    actor: Option<&ActorView>,
) -> Result<MastershipMove, Refusal> {
    let op = Operation::MoveMastership { to: to.to_owned() };
    check(&op, item, here, actor)?;
    Ok(hand_over(item, here, to))
}

/// Moves mastership of a user record and of the workspace items that user created
/// and `here` masters. The items follow their creator's record, so they need no
/// acting user. Returns the record's move first, then the items'.
pub fn move_user_mastership(
    user: &mut ItemView,
    items: &mut [ItemView],
    here: &str,
    to: &str,
) -> Result<Vec<MastershipMove>, Refusal> {
    let op = Operation::MoveMastership { to: to.to_owned() };
    check(&op, user, here, None)?;
    let mut moves = vec![hand_over(user, here, to)];
    for item in items
        .iter_mut()
        .filter(|item| carried_with(item, &user.id, here))
    {
        moves.push(hand_over(item, here, to));
    }
    Ok(moves)
}

/// The workspace items that move with `user`'s record when `from`, its master,
/// moves it: those the user created that `from` masters. Items the user created
/// that another replica masters stay; only their master can move them.
pub fn items_moving_with_user<'a>(user: &str, from: &str, items: &'a [ItemView]) -> Vec<&'a str> {
    items
        .iter()
        .filter(|item| carried_with(item, user, from))
        .map(|item| item.id.as_str())
        .collect()
}

fn carried_with(item: &ItemView, user: &str, from: &str) -> bool {
    item.kind == ItemKind::WorkspaceItem
        && item.creator.as_deref() == Some(user)
        && item.master.is_at(from)
}

/// Takes mastership of `item` at `here` from a master that is gone for good, if
/// allowed. The local view becomes the master at once: there is nobody to wait for.
pub fn take_over(
    item: &mut ItemView,
    here: &str,
    force: bool,
    master_status: ReplicaStatus,
) -> Result<MastershipMove, Refusal> {
    check_takeover(item, here, force, master_status)?;
    let movement = MastershipMove {
        item: item.id.clone(),
        from: item.master.replica().to_owned(),
        to: here.to_owned(),
        moves: item.moves.saturating_add(1),
        forced: true,
    };
    item.master = Master::At(here.to_owned());
    item.moves = movement.moves;
    Ok(movement)
}

fn hand_over(item: &mut ItemView, here: &str, to: &str) -> MastershipMove {
    item.moves = item.moves.saturating_add(1);
    item.master = Master::InTransit {
        from: here.to_owned(),
        to: to.to_owned(),
    };
    MastershipMove {
        item: item.id.clone(),
        from: here.to_owned(),
        to: to.to_owned(),
        moves: item.moves,
        forced: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HERE: &str = "sampl-lyon";
    const OTHER: &str = "sampl-paris";
    const THIRD: &str = "sampl-rome";

    fn view(kind: ItemKind, master: Master) -> ItemView {
        ItemView {
            id: "SAMPL00042".to_owned(),
            kind,
            master,
            moves: 0,
            creator: Some("alice".to_owned()),
        }
    }

    fn at(replica: &str) -> Master {
        Master::At(replica.to_owned())
    }

    fn actor_mastered_at(replica: &str) -> ActorView {
        ActorView {
            user: "alice".to_owned(),
            user_master: at(replica),
        }
    }

    fn modify(item: &ItemView, here: &str) -> Result<(), Refusal> {
        check(
            &Operation::Modify,
            item,
            here,
            Some(&actor_mastered_at(here)),
        )
    }

    fn all_operations() -> Vec<Operation> {
        vec![
            Operation::Read,
            Operation::Print,
            Operation::Modify,
            Operation::ChangeState,
            Operation::Delete,
            Operation::Rename,
            Operation::Edit,
            Operation::Move,
            Operation::MoveMastership {
                to: THIRD.to_owned(),
            },
            Operation::TakeOver {
                force: true,
                master_status: ReplicaStatus::Alive,
            },
        ]
    }

    #[test]
    fn operations_by_kind_and_where_the_master_is() {
        let masters = [
            ("mastered here", at(HERE)),
            ("mastered elsewhere", at(OTHER)),
            (
                "in transit from here",
                Master::InTransit {
                    from: HERE.to_owned(),
                    to: OTHER.to_owned(),
                },
            ),
        ];
        let mut cases = 0;
        for kind in [ItemKind::Record, ItemKind::WorkspaceItem, ItemKind::User] {
            for (place, master) in &masters {
                for op in all_operations() {
                    let item = view(kind, master.clone());
                    let here_is_master = *place == "mastered here";
                    let allowed = match op {
                        Operation::Read | Operation::Print => true,
                        // The master is alive in every row.
                        Operation::TakeOver { .. } => false,
                        _ => here_is_master,
                    };
                    let outcome = check(&op, &item, HERE, Some(&actor_mastered_at(HERE)));
                    assert_eq!(
                        outcome.is_ok(),
                        allowed,
                        "{kind} {place} {op:?}: {outcome:?}"
                    );
                    if let Err(refusal) = outcome {
                        let master = if here_is_master { HERE } else { OTHER };
                        let message = refusal.to_string();
                        assert!(message.contains(master), "{kind} {place} {op:?}: {message}");
                    }
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 90);
    }

    #[test]
    fn remote_master_refusal_names_the_master() {
        let record = view(ItemKind::Record, at(OTHER));
        assert_eq!(
            modify(&record, HERE).map_err(|r| r.to_string()),
            Err("record SAMPL00042 is mastered at replica sampl-paris; change it there or move its mastership here"
                .to_owned())
        );
    }

    #[test]
    fn a_new_item_is_mastered_where_it_was_created() {
        let item = ItemView::created("SAMPL00001", ItemKind::Record, HERE, None);
        assert_eq!(item.master, at(HERE));
        assert!(modify(&item, HERE).is_ok());
        assert!(modify(&item, OTHER).is_err());
    }

    #[test]
    fn nobody_can_change_an_item_until_the_new_master_imports_the_move() {
        let mut old = ItemView::created("SAMPL00001", ItemKind::Record, HERE, None);
        let mut new = old.clone();
        let mut third = old.clone();
        let movement = move_mastership(&mut old, HERE, OTHER, None);
        let Ok(movement) = movement else {
            panic!("the master may move mastership: {movement:?}");
        };
        assert!(matches!(modify(&old, HERE), Err(Refusal::InTransit { .. })));
        assert!(matches!(
            modify(&new, OTHER),
            Err(Refusal::RemoteMaster { .. })
        ));
        assert!(third.import_move(&movement));
        assert!(modify(&third, THIRD).is_err());
        assert!(new.import_move(&movement));
        assert!(modify(&new, OTHER).is_ok());
        old.move_imported(&movement);
        assert_eq!(old.master, at(OTHER));
        assert!(modify(&old, HERE).is_err());
    }

    #[test]
    fn a_move_already_seen_or_out_of_date_is_ignored() {
        let mut a = ItemView::created("SAMPL00001", ItemKind::Record, HERE, None);
        let mut b = a.clone();
        let mut c = a.clone();
        let Ok(first) = move_mastership(&mut a, HERE, OTHER, None) else {
            panic!("first move refused");
        };
        assert!(b.import_move(&first));
        let Ok(second) = move_mastership(&mut b, OTHER, THIRD, None) else {
            panic!("second move refused");
        };
        assert!(c.import_move(&second));
        assert!(
            !c.import_move(&first),
            "a late packet must not bring back an old master"
        );
        assert!(!c.import_move(&second));
        assert_eq!(c.master, at(THIRD));
        let other_item = MastershipMove {
            item: "SAMPL00002".to_owned(),
            ..second
        };
        assert!(!a.import_move(&other_item));
    }

    #[test]
    fn only_the_master_moves_mastership_and_not_to_itself() {
        let mut item = view(ItemKind::Record, at(OTHER));
        assert!(matches!(
            move_mastership(&mut item, HERE, THIRD, None),
            Err(Refusal::RemoteMaster { .. })
        ));
        let mut item = view(ItemKind::Record, at(HERE));
        assert!(matches!(
            move_mastership(&mut item, HERE, HERE, None),
            Err(Refusal::AlreadyMastered { .. })
        ));
        assert_eq!(item.master, at(HERE));
    }

    /// Workspace items follow the ordinary rule: changed at their master, whoever owns
    /// them (a moved item at its new master, an item without owner at its master).
    #[test]
    fn a_workspace_item_is_changed_at_its_master_whoever_owns_it() {
        let changes = [
            Operation::Modify,
            Operation::Edit,
            Operation::Rename,
            Operation::Delete,
            Operation::Move,
            Operation::ChangeState,
        ];
        let owned = ItemView::created("q", ItemKind::WorkspaceItem, HERE, Some("alice"));
        let ownerless = ItemView::created("r", ItemKind::WorkspaceItem, HERE, None);
        let elsewhere = Some(&actor_mastered_at(OTHER));
        for op in &changes {
            // The owner's user record elsewhere, or nobody logged in: still its master's.
            assert!(check(op, &owned, HERE, elsewhere).is_ok(), "{op:?}");
            assert!(check(op, &owned, HERE, None).is_ok(), "{op:?}");
            assert!(check(op, &ownerless, HERE, None).is_ok(), "{op:?}");
            assert!(
                matches!(
                    check(op, &owned, OTHER, None),
                    Err(Refusal::RemoteMaster { .. })
                ),
                "{op:?}"
            );
        }
        // Moved on its own to OTHER: changed there, not here any more.
        let mut moved = owned.clone();
        let mv = move_mastership(&mut moved, HERE, OTHER, None).expect("a move");
        assert!(check(&Operation::Edit, &moved, HERE, None).is_err());
        let mut at_other = owned;
        at_other.import_move(&mv);
        assert!(check(&Operation::Edit, &at_other, OTHER, elsewhere).is_ok());
    }

    /// A user's own tasks need that user logged in at the replica that masters their
    /// user record, wherever the item they concern is mastered.
    #[test]
    fn a_users_own_tasks_need_their_user_record_mastered_here() {
        let query = view(ItemKind::WorkspaceItem, at(OTHER));
        for task in [
            UserTask::ChangeProfile,
            UserTask::SaveQueryDefaults,
            UserTask::AssignStartupQueries,
            UserTask::AddFavourite,
        ] {
            let op = Operation::UserTask(task);
            assert!(check(&op, &query, HERE, Some(&actor_mastered_at(HERE))).is_ok());
            let refusal = check(&op, &query, HERE, Some(&actor_mastered_at(OTHER)));
            assert!(
                matches!(&refusal, Err(Refusal::UserMasteredElsewhere { .. })),
                "{task}"
            );
            assert!(
                refusal
                    .map_err(|r| r.to_string())
                    .is_err_and(|m| m.contains(OTHER) && m.contains(&task.to_string()))
            );
            assert!(matches!(
                check(&op, &query, HERE, None),
                Err(Refusal::NoUser { .. })
            ));
            let moving = ActorView {
                user: "alice".to_owned(),
                user_master: Master::InTransit {
                    from: HERE.to_owned(),
                    to: OTHER.to_owned(),
                },
            };
            assert!(check(&op, &query, HERE, Some(&moving)).is_err());
        }
    }

    /// A change may carry a mastership move: at the master, to another replica, and
    /// never where the change alone would be refused.
    #[test]
    fn a_change_may_move_the_mastership_at_the_master_only() {
        let record = view(ItemKind::Record, at(HERE));
        let remote = view(ItemKind::Record, at(OTHER));
        let moving = view(
            ItemKind::Record,
            Master::InTransit {
                from: HERE.to_owned(),
                to: OTHER.to_owned(),
            },
        );
        let rows: [(&ItemView, &str, Option<&str>); 5] = [
            (&record, OTHER, None),
            (&record, HERE, Some("AlreadyMastered")),
            (&remote, HERE, Some("RemoteMaster")),
            (&remote, "third", Some("RemoteMaster")),
            (&moving, "third", Some("InTransit")),
        ];
        for (item, to, refused) in rows {
            let got = check_change_with_move(&Operation::Modify, item, HERE, to, None);
            let name = got.as_ref().err().map(|r| match r {
                Refusal::AlreadyMastered { .. } => "AlreadyMastered",
                Refusal::RemoteMaster { .. } => "RemoteMaster",
                Refusal::InTransit { .. } => "InTransit",
                _ => "other",
            });
            assert_eq!(name, refused, "{item:?} to {to}");
        }
        // A read carries no move.
        assert!(check_change_with_move(&Operation::Read, &remote, HERE, "third", None).is_err());
    }

    #[test]
    fn changing_a_record_needs_no_logged_in_user() {
        let record = view(ItemKind::Record, at(HERE));
        assert!(check(&Operation::ChangeState, &record, HERE, None).is_ok());
    }

    fn workspace_item(id: &str, creator: &str, master: &str) -> ItemView {
        ItemView::created(id, ItemKind::WorkspaceItem, master, Some(creator))
    }

    #[test]
    fn workspace_items_move_with_their_creators_user_record() {
        let mut user = ItemView::created("alice", ItemKind::User, HERE, None);
        let mut items = vec![
            workspace_item("alice-open-defects", "alice", HERE),
            workspace_item("bob-open-defects", "bob", HERE),
            workspace_item("alice-chart", "alice", OTHER),
            ItemView::created("SAMPL00001", ItemKind::Record, HERE, Some("alice")),
            workspace_item("alice-report", "alice", HERE),
        ];
        assert_eq!(
            items_moving_with_user("alice", HERE, &items),
            ["alice-open-defects", "alice-report"]
        );
        let moves = move_user_mastership(&mut user, &mut items, HERE, OTHER);
        let moved: Vec<String> = moves.into_iter().flatten().map(|m| m.item).collect();
        assert_eq!(moved, ["alice", "alice-open-defects", "alice-report"]);
        let in_transit = Master::InTransit {
            from: HERE.to_owned(),
            to: OTHER.to_owned(),
        };
        assert_eq!(user.master, in_transit);
        assert_eq!(items[0].master, in_transit);
        assert_eq!(items[1].master, at(HERE));
        assert_eq!(items[4].master, in_transit);
    }

    #[test]
    fn a_user_record_mastered_elsewhere_moves_nothing() {
        let mut user = ItemView::created("alice", ItemKind::User, OTHER, None);
        let mut items = vec![workspace_item("alice-open-defects", "alice", HERE)];
        assert!(move_user_mastership(&mut user, &mut items, HERE, THIRD).is_err());
        assert_eq!(items[0].master, at(HERE));
    }

    #[test]
    fn takeover_needs_an_explicit_force_request() {
        let mut item = view(ItemKind::Record, at(OTHER));
        let refused = take_over(&mut item, HERE, false, ReplicaStatus::Removed);
        assert!(matches!(refused, Err(Refusal::TakeoverNotForced { .. })));
        assert_eq!(item.master, at(OTHER));
    }

    #[test]
    fn takeover_needs_the_master_known_to_be_removed() {
        for status in [ReplicaStatus::Alive, ReplicaStatus::Unreachable] {
            let mut item = view(ItemKind::Record, at(OTHER));
            let refused = take_over(&mut item, HERE, true, status).map_err(|r| r.to_string());
            assert!(refused.is_err_and(|m| m.contains(OTHER) && m.contains(&status.to_string())));
            assert_eq!(item.master, at(OTHER));
        }
    }

    #[test]
    fn forced_takeover_from_a_removed_master_makes_this_replica_master() {
        let mut item = view(ItemKind::Record, at(OTHER));
        let Ok(movement) = take_over(&mut item, HERE, true, ReplicaStatus::Removed) else {
            panic!("takeover from a removed master refused");
        };
        assert_eq!(item.master, at(HERE));
        assert!(modify(&item, HERE).is_ok());
        assert!(movement.forced);
        assert_eq!(
            (movement.from.as_str(), movement.to.as_str(), movement.moves),
            (OTHER, HERE, 1)
        );
        let mut elsewhere = view(ItemKind::Record, at(OTHER));
        assert!(elsewhere.import_move(&movement));
        assert_eq!(elsewhere.master, at(HERE));
    }

    #[test]
    fn old_master_may_take_back_an_item_in_transit_to_a_removed_replica() {
        let mut item = view(ItemKind::Record, at(HERE));
        assert!(move_mastership(&mut item, HERE, OTHER, None).is_ok());
        assert!(take_over(&mut item, HERE, true, ReplicaStatus::Removed).is_ok());
        assert_eq!((item.master.clone(), item.moves), (at(HERE), 2));
    }

    #[test]
    fn takeover_at_the_master_is_refused() {
        let mut item = view(ItemKind::Record, at(HERE));
        assert!(matches!(
            take_over(&mut item, HERE, true, ReplicaStatus::Removed),
            Err(Refusal::AlreadyMastered { .. })
        ));
    }

    // ---- properties ----

    #[derive(Debug, Clone)]
    enum Event {
        /// A replica tries to move mastership to another.
        Move { at: usize, to: usize },
        /// One packet in flight reaches its receiver; `again` keeps a copy in flight.
        Deliver { pick: usize, again: bool },
        /// The old master learns that a delivered move was imported by its target.
        Acknowledge { pick: usize },
        /// A replica tries a forced takeover; every replica is alive.
        TakeOver { at: usize, unreachable: bool },
    }

    fn event_strategy() -> impl Strategy<Value = Event> {
        prop_oneof![
            3 => (0..5usize, 0..5usize).prop_map(|(at, to)| Event::Move { at, to }),
            5 => (any::<usize>(), proptest::bool::weighted(0.2))
                .prop_map(|(pick, again)| Event::Deliver { pick, again }),
            1 => any::<usize>().prop_map(|pick| Event::Acknowledge { pick }),
            1 => (0..5usize, any::<bool>()).prop_map(|(at, unreachable)| Event::TakeOver { at, unreachable }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn never_two_replicas_allow_a_change_of_the_same_item(
            replicas in 3..=5usize,
            creator in 0..5usize,
            user_record in any::<bool>(),
            events in proptest::collection::vec(event_strategy(), 1..60),
        ) {
            let names: Vec<String> = (0..replicas).map(|i| format!("r{i}")).collect();
            let kind = if user_record { ItemKind::User } else { ItemKind::Record };
            let creator = creator % replicas;
            let mut views: Vec<ItemView> = (0..replicas)
                .map(|_| ItemView::created("SAMPL00001", kind, &names[creator], None))
                .collect();
            // The test's own account of the truth: the latest move, and whether its
            // target has imported it.
            let (mut latest_target, mut latest_moves, mut imported) = (creator, 0u64, true);
            let mut in_flight: Vec<(MastershipMove, usize)> = Vec::new();
            let mut delivered: Vec<MastershipMove> = Vec::new();
            for event in &events {
                match *event {
                    Event::Move { at, to } => {
                        let (at, to) = (at % replicas, to % replicas);
                        let outcome = move_mastership(&mut views[at], &names[at], &names[to], None);
                        let may = imported && at == latest_target && at != to;
                        prop_assert_eq!(outcome.is_ok(), may, "move {} -> {}: {:?}", at, to, outcome);
                        if let Ok(movement) = outcome {
                            prop_assert_eq!(movement.moves, latest_moves + 1);
                            (latest_target, latest_moves, imported) = (to, movement.moves, false);
                            for receiver in (0..replicas).filter(|&r| r != at) {
                                in_flight.push((movement.clone(), receiver));
                            }
                        }
                    }
                    Event::Deliver { pick, again } => {
                        if !in_flight.is_empty() {
                            let at = pick % in_flight.len();
                            let (movement, receiver) = if again {
                                in_flight[at].clone()
                            } else {
                                in_flight.swap_remove(at)
                            };
                            views[receiver].import_move(&movement);
                            if names[receiver] == movement.to {
                                if movement.moves == latest_moves {
                                    imported = true;
                                }
                                delivered.push(movement);
                            }
                        }
                    }
                    Event::Acknowledge { pick } => {
                        if !delivered.is_empty() {
                            let movement = &delivered[pick % delivered.len()];
                            if let Some(old) = names.iter().position(|n| *n == movement.from) {
                                views[old].move_imported(movement);
                            }
                        }
                    }
                    Event::TakeOver { at, unreachable } => {
                        let at = at % replicas;
                        let status = if unreachable { ReplicaStatus::Unreachable } else { ReplicaStatus::Alive };
                        prop_assert!(take_over(&mut views[at], &names[at], true, status).is_err());
                    }
                }
                let allowing: Vec<usize> = (0..replicas)
                    .filter(|&r| check(&Operation::Modify, &views[r], &names[r], None).is_ok())
                    .collect();
                prop_assert!(allowing.len() <= 1, "{:?} all allow a change", allowing);
                let expected: Vec<usize> = if imported { vec![latest_target] } else { vec![] };
                prop_assert_eq!(allowing, expected);
            }
        }

        #[test]
        fn a_user_record_move_carries_exactly_their_items_mastered_here(
            items in proptest::collection::vec((0..3usize, 0..3usize, any::<bool>()), 0..12),
        ) {
            let users = ["alice", "bob", "carol"];
            let replicas = [HERE, OTHER, THIRD];
            let mut views: Vec<ItemView> = items
                .iter()
                .enumerate()
                .map(|(i, &(creator, master, workspace))| {
                    let kind = if workspace { ItemKind::WorkspaceItem } else { ItemKind::Record };
                    ItemView::created(&format!("item-{i}"), kind, replicas[master], Some(users[creator]))
                })
                .collect();
            let before = views.clone();
            let mut alice = ItemView::created("alice", ItemKind::User, HERE, None);
            let moves = move_user_mastership(&mut alice, &mut views, HERE, OTHER);
            prop_assert!(moves.is_ok());
            for (old, new) in before.iter().zip(&views) {
                let follows = old.kind == ItemKind::WorkspaceItem
                    && old.creator.as_deref() == Some("alice")
                    && old.master == at(HERE);
                let in_transit = Master::InTransit { from: HERE.to_owned(), to: OTHER.to_owned() };
                prop_assert_eq!(new.master == in_transit, follows, "{:?}", old);
                prop_assert_eq!(new != old, follows);
            }
        }
    }
}
