//! The link task scheduler: decides whether a synchronisation task that comes due
//! on a link starts now, waits in the queue or is dropped, and which waiting tasks
//! start when a running one ends. It only decides: it runs nothing and reads no clock.
//!
//! The rules (DOMAIN.md section 5):
//! - a link runs at most one task at a time;
//! - a task that comes due while a task of the same type runs on its link, or
//!   already waits for it, is dropped; one of the other type waits and runs after;
//! - when a full and an incremental task of one link come due together, the full
//!   one runs first;
//! - across links, either up to `max_concurrent_full` full tasks run, or up to
//!   `max_concurrent_incremental` incremental tasks of different links; full and
//!   incremental tasks never run at the same time;
//! - a scheduled task needs its link enabled, set to automatic and integrity
//!   checked; a manual one (a person or an annotation asked for it) needs only the
//!   link enabled.
//!
//! Queue discipline: one queue, in due order. Whenever something may have freed a
//! slot, the queue is scanned from the front. A task whose own link is busy is
//! passed over: it cannot start anyway, and holding others back for it gains
//! nothing. The first task that only the global limits hold back ends the scan, so
//! no later task overtakes it; otherwise a steady stream of incremental tasks could
//! keep a full task waiting for ever.
//!
//! Tasks that come due at one instant (one call to [`Scheduler::tasks_due`]) are
//! taken full tasks first, then incremental ones, each in the order given. That
//! is the source's rule for one link, and applying it to the whole instant keeps
//! the rarer full tasks from waiting behind incrementals that came due with them.
//!
//! Links may belong to groups (the families of one operator, [`Scheduler::grouped`]): the
//! limits above then hold across all groups, and a group's own limits, where set, narrow
//! them for its links. A task that only its group's limits hold back is passed over like
//! one whose link is busy, so one family's narrower limits never hold up another's.
//!
//! Queued tasks always pass their link's gates: disabling a link drops its queued
//! tasks, and a link that loses its automatic setting or integrity check drops its
//! queued scheduled tasks. Running tasks are never cut short; they finish.

use std::collections::BTreeMap;
use std::fmt;
use std::num::{NonZeroU32, NonZeroU64};

/// The two kinds of synchronisation task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TaskKind {
    Incremental,
    Full,
}

/// Why a task came due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Trigger {
    /// The link's timetable: runs only on a link that may run automatically.
    Scheduled,
    /// A person or an annotation asked for it.
    Manual,
}

/// One task of one link.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Task<L> {
    pub link: L,
    pub kind: TaskKind,
    pub trigger: Trigger,
}

impl<L> Task<L> {
    pub fn new(link: L, kind: TaskKind, trigger: Trigger) -> Self {
        Task {
            link,
            kind,
            trigger,
        }
    }
}

/// The settings of a link that decide whether its tasks may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinkGates {
    pub enabled: bool,
    pub automatic: bool,
    pub integrity_checked: bool,
}

impl LinkGates {
    /// Why a task with `trigger` may not run on a link with these gates, if it may not.
    /// Being enabled is checked first because it concerns every task.
    pub fn refusal(&self, trigger: Trigger) -> Option<DropReason> {
        if !self.enabled {
            Some(DropReason::LinkDisabled)
        } else if trigger == Trigger::Manual {
            None
        } else if !self.integrity_checked {
            Some(DropReason::IntegrityCheckPending)
        } else if !self.automatic {
            Some(DropReason::NotAutomatic)
        } else {
            None
        }
    }
}

/// How many tasks may run at once across all links.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limits {
    pub max_concurrent_full: NonZeroU32,
    pub max_concurrent_incremental: NonZeroU32,
}

impl Default for Limits {
    /// The source's figures: one full task, or five incremental ones.
    fn default() -> Self {
        Limits {
            max_concurrent_full: NonZeroU32::MIN,
            max_concurrent_incremental: NonZeroU32::MIN.saturating_add(4),
        }
    }
}

/// What happens to a task that comes due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    Start,
    Queue,
    Drop(DropReason),
}

/// Why a task was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    SameTypeRunning,
    SameTypeQueued,
    LinkDisabled,
    NotAutomatic,
    IntegrityCheckPending,
    UnknownLink,
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DropReason::SameTypeRunning => "a task of the same type is already running on the link",
            DropReason::SameTypeQueued => "a task of the same type is already waiting for the link",
            DropReason::LinkDisabled => "the link is disabled",
            DropReason::NotAutomatic => "the link is not set to run automatically",
            DropReason::IntegrityCheckPending => "the link has not passed an integrity check",
            DropReason::UnknownLink => "the link is not registered",
        })
    }
}

/// What a change of settings did to the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rescheduled<L> {
    /// Queued tasks that started because the change unblocked them.
    pub started: Vec<Task<L>>,
    /// Queued tasks removed because they may no longer run.
    pub dropped: Vec<(Task<L>, DropReason)>,
}

/// The scheduler's state: the known links, the running tasks and the queue.
#[derive(Debug, Clone)]
pub struct Scheduler<L, G = ()> {
    limits: Limits,
    /// The group (family) a link belongs to.
    group_of: fn(&L) -> G,
    /// Groups whose own limits narrow the overall ones for their links.
    group_limits: BTreeMap<G, Limits>,
    links: BTreeMap<L, LinkGates>,
    running: Vec<Task<L>>,
    queue: Vec<Task<L>>,
}

impl<L: Clone + Ord> Scheduler<L> {
    /// A scheduler whose limits hold across all its links.
    pub fn new(limits: Limits) -> Self {
        Self::grouped(limits, |_| ())
    }
}

/// Why a queued task cannot start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Room {
    Free,
    /// Its group's own limits hold it back: tasks of other groups may still start.
    GroupFull,
    /// The overall limits hold it back: nothing behind it may overtake it.
    Full,
}

impl<L: Clone + Ord, G: Clone + Ord> Scheduler<L, G> {
    /// A scheduler whose links belong to groups (the families of one operator): `limits`
    /// hold across all links, and a group's own limits, where set, narrow them for its
    /// links; the stricter of the two always wins.
    pub fn grouped(limits: Limits, group_of: fn(&L) -> G) -> Self {
        Scheduler {
            limits,
            group_of,
            group_limits: BTreeMap::new(),
            links: BTreeMap::new(),
            running: Vec::new(),
            queue: Vec::new(),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Changes the limits. Running tasks above a lowered limit finish; raising a
    /// limit may start queued tasks, which are returned.
    pub fn set_limits(&mut self, limits: Limits) -> Vec<Task<L>> {
        self.limits = limits;
        self.dispatch()
    }

    /// The own limits of `group`, if it has any.
    pub fn group_limits(&self, group: &G) -> Option<Limits> {
        self.group_limits.get(group).copied()
    }

    /// Sets or clears the own limits of `group`, like [`Scheduler::set_limits`].
    pub fn set_group_limits(&mut self, group: G, limits: Option<Limits>) -> Vec<Task<L>> {
        match limits {
            Some(limits) => self.group_limits.insert(group, limits),
            None => self.group_limits.remove(&group),
        };
        self.dispatch()
    }

    /// The gates of a registered link.
    pub fn gates(&self, link: &L) -> Option<LinkGates> {
        self.links.get(link).copied()
    }

    /// Registers a link or updates its gates. Queued tasks that the new gates no
    /// longer let run are dropped; their places may let others start.
    pub fn set_gates(&mut self, link: L, gates: LinkGates) -> Rescheduled<L> {
        let dropped = self.drop_queued(|task| {
            if task.link == link {
                gates.refusal(task.trigger)
            } else {
                None
            }
        });
        self.links.insert(link, gates);
        let started = self.dispatch();
        Rescheduled { started, dropped }
    }

    /// Forgets a link and drops its queued tasks. A running task of the link still
    /// holds its slot until [`Scheduler::task_finished`] reports its end.
    pub fn remove_link(&mut self, link: &L) -> Rescheduled<L> {
        self.links.remove(link);
        let dropped =
            self.drop_queued(|task| (&task.link == link).then_some(DropReason::UnknownLink));
        let started = self.dispatch();
        Rescheduled { started, dropped }
    }

    /// Decides on tasks that come due at one instant. Returns each task with its
    /// decision, in the order given; full tasks are decided before incremental ones.
    pub fn tasks_due(
        &mut self,
        due: impl IntoIterator<Item = Task<L>>,
    ) -> Vec<(Task<L>, Decision)> {
        let due: Vec<Task<L>> = due.into_iter().collect();
        let mut order: Vec<usize> = (0..due.len()).collect();
        // Stable, so each kind keeps the order given.
        order.sort_by_key(|&i| due[i].kind != TaskKind::Full);
        let mut decisions = vec![Decision::Queue; due.len()];
        for i in order {
            decisions[i] = self.admit(&due[i]);
        }
        due.into_iter().zip(decisions).collect()
    }

    /// The running task of `link` ended. Returns the queued tasks that started in
    /// its place. A link with no running task changes nothing.
    pub fn task_finished(&mut self, link: &L) -> Vec<Task<L>> {
        match self.running.iter().position(|task| &task.link == link) {
            Some(at) => {
                self.running.remove(at);
                self.dispatch()
            }
            None => Vec::new(),
        }
    }

    /// The running tasks, in the order they started.
    pub fn running(&self) -> &[Task<L>] {
        &self.running
    }

    /// The waiting tasks, in due order.
    pub fn queued(&self) -> &[Task<L>] {
        &self.queue
    }

    /// The task running on `link`, if any (the UI's "running" mark).
    pub fn running_on(&self, link: &L) -> Option<&Task<L>> {
        self.running.iter().find(|task| &task.link == link)
    }

    fn admit(&mut self, task: &Task<L>) -> Decision {
        let Some(gates) = self.links.get(&task.link) else {
            return Decision::Drop(DropReason::UnknownLink);
        };
        if let Some(reason) = gates.refusal(task.trigger) {
            return Decision::Drop(reason);
        }
        let same = |other: &Task<L>| other.link == task.link && other.kind == task.kind;
        if self.running.iter().any(same) {
            return Decision::Drop(DropReason::SameTypeRunning);
        }
        if self.queue.iter().any(same) {
            return Decision::Drop(DropReason::SameTypeQueued);
        }
        // Joining the back of the queue keeps due order; dispatch starts it at
        // once if nothing ahead of it is held back.
        self.queue.push(task.clone());
        if self.dispatch().iter().any(same) {
            Decision::Start
        } else {
            Decision::Queue
        }
    }

    /// Whether `task` fits beside the running tasks: under the overall limits, then
    /// under its group's own.
    fn room_for(&self, task: &Task<L>) -> Room {
        if !fits(self.running.iter(), self.limits, task.kind) {
            return Room::Full;
        }
        let group = (self.group_of)(&task.link);
        match self.group_limits.get(&group) {
            Some(limits) => {
                let in_group = self
                    .running
                    .iter()
                    .filter(|t| (self.group_of)(&t.link) == group);
                if fits(in_group, *limits, task.kind) {
                    Room::Free
                } else {
                    Room::GroupFull
                }
            }
            None => Room::Free,
        }
    }

    /// Starts queued tasks under the queue discipline described in the module doc.
    fn dispatch(&mut self) -> Vec<Task<L>> {
        let mut started = Vec::new();
        let mut at = 0;
        while let Some(task) = self.queue.get(at) {
            if self.running_on(&task.link).is_some() {
                at += 1;
                continue;
            }
            match self.room_for(task) {
                Room::Free => {}
                Room::GroupFull => {
                    at += 1;
                    continue;
                }
                Room::Full => break,
            }
            let task = self.queue.remove(at);
            self.running.push(task.clone());
            started.push(task);
        }
        started
    }

    fn drop_queued(
        &mut self,
        reason: impl Fn(&Task<L>) -> Option<DropReason>,
    ) -> Vec<(Task<L>, DropReason)> {
        let mut dropped = Vec::new();
        self.queue.retain(|task| match reason(task) {
            Some(why) => {
                dropped.push((task.clone(), why));
                false
            }
            None => true,
        });
        dropped
    }
}

/// Whether a task of `kind` fits beside `running` under `limits`: a full task runs
/// alone among full tasks, incremental ones share their slots, and the two kinds never
/// run at the same time.
fn fits<'a, L: 'a>(
    running: impl Iterator<Item = &'a Task<L>>,
    limits: Limits,
    kind: TaskKind,
) -> bool {
    let (mut full, mut incremental) = (0u32, 0u32);
    for task in running {
        match task.kind {
            TaskKind::Full => full = full.saturating_add(1),
            TaskKind::Incremental => incremental = incremental.saturating_add(1),
        }
    }
    match kind {
        TaskKind::Full => incremental == 0 && full < limits.max_concurrent_full.get(),
        TaskKind::Incremental => full == 0 && incremental < limits.max_concurrent_incremental.get(),
    }
}

/// How often a link's tasks come due, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Timetable {
    pub incremental_every: NonZeroU64,
    pub full_every: NonZeroU64,
}

/// When each kind of task last came due on a link (seconds), `None` if never.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct LastDue {
    pub incremental: Option<u64>,
    pub full: Option<u64>,
}

/// The kinds due now and when the next task comes due.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DueNow {
    /// Full first, as the scheduler takes them.
    pub kinds: Vec<TaskKind>,
    /// When the next task comes due, once the kinds due now are recorded as due at `now`.
    pub next_due_at: u64,
}

impl Timetable {
    /// Which kinds are due at `now`. A kind that never came due is due at once.
    /// Missed intervals collapse into one task (no catching up), and a last time
    /// after `now` (a clock stepped back) counts as `now`, so a task is never
    /// postponed beyond one interval.
    pub fn due_at(&self, last: LastDue, now: u64) -> DueNow {
        let mut kinds = Vec::new();
        let mut next_due_at = u64::MAX;
        for (kind, last, every) in [
            (TaskKind::Full, last.full, self.full_every),
            (
                TaskKind::Incremental,
                last.incremental,
                self.incremental_every,
            ),
        ] {
            let after_last = last.map(|at| at.min(now).saturating_add(every.get()));
            let next = match after_last {
                Some(at) if at > now => at,
                _ => {
                    kinds.push(kind);
                    now.saturating_add(every.get())
                }
            };
            next_due_at = next_due_at.min(next);
        }
        DueNow { kinds, next_due_at }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    use TaskKind::{Full, Incremental};
    use Trigger::{Manual, Scheduled};

    const OPEN: LinkGates = LinkGates {
        enabled: true,
        automatic: true,
        integrity_checked: true,
    };

    fn limits(full: u32, incremental: u32) -> Limits {
        Limits {
            max_concurrent_full: NonZeroU32::new(full).unwrap_or(NonZeroU32::MIN),
            max_concurrent_incremental: NonZeroU32::new(incremental).unwrap_or(NonZeroU32::MIN),
        }
    }

    fn scheduler(limits: Limits, links: &[&'static str]) -> Scheduler<&'static str> {
        let mut s = Scheduler::new(limits);
        for &link in links {
            s.set_gates(link, OPEN);
        }
        s
    }

    fn sched(link: &'static str, kind: TaskKind) -> Task<&'static str> {
        Task::new(link, kind, Scheduled)
    }

    fn decide(s: &mut Scheduler<&'static str>, link: &'static str, kind: TaskKind) -> Decision {
        decide_task(s, sched(link, kind))
    }

    fn decide_task(s: &mut Scheduler<&'static str>, task: Task<&'static str>) -> Decision {
        let decided = s.tasks_due([task]);
        assert_eq!(decided.len(), 1);
        decided[0].1
    }

    fn running(s: &Scheduler<&'static str>) -> Vec<(&'static str, TaskKind)> {
        s.running().iter().map(|t| (t.link, t.kind)).collect()
    }

    fn queued(s: &Scheduler<&'static str>) -> Vec<(&'static str, TaskKind)> {
        s.queued().iter().map(|t| (t.link, t.kind)).collect()
    }

    #[test]
    fn default_limits_are_one_full_or_five_incremental() {
        assert_eq!(Limits::default(), limits(1, 5));
    }

    #[test]
    fn a_link_runs_at_most_one_task_at_a_time() {
        let mut s = scheduler(limits(3, 5), &["a"]);
        assert_eq!(decide(&mut s, "a", Incremental), Decision::Start);
        assert_eq!(decide(&mut s, "a", Full), Decision::Queue);
        assert_eq!(running(&s), [("a", Incremental)]);
    }

    #[test]
    fn same_type_due_while_running_is_dropped() {
        let mut s = scheduler(Limits::default(), &["a"]);
        assert_eq!(decide(&mut s, "a", Incremental), Decision::Start);
        assert_eq!(
            decide_task(&mut s, Task::new("a", Incremental, Manual)),
            Decision::Drop(DropReason::SameTypeRunning)
        );
        assert!(s.queued().is_empty());
    }

    #[test]
    fn different_type_due_while_running_waits_and_runs_when_the_first_ends() {
        let mut s = scheduler(Limits::default(), &["a"]);
        assert_eq!(decide(&mut s, "a", Incremental), Decision::Start);
        assert_eq!(decide(&mut s, "a", Full), Decision::Queue);
        assert_eq!(s.task_finished(&"a"), [sched("a", Full)]);
        assert_eq!(running(&s), [("a", Full)]);
        assert!(s.queued().is_empty());
    }

    #[test]
    fn same_type_already_queued_drops_the_newcomer() {
        let mut s = scheduler(Limits::default(), &["a"]);
        decide(&mut s, "a", Incremental);
        assert_eq!(decide(&mut s, "a", Full), Decision::Queue);
        assert_eq!(
            decide(&mut s, "a", Full),
            Decision::Drop(DropReason::SameTypeQueued)
        );
        assert_eq!(queued(&s), [("a", Full)]);
    }

    #[test]
    fn full_and_incremental_due_together_full_runs_first() {
        let mut s = scheduler(Limits::default(), &["a"]);
        let decided = s.tasks_due([sched("a", Incremental), sched("a", Full)]);
        assert_eq!(
            decided,
            [
                (sched("a", Incremental), Decision::Queue),
                (sched("a", Full), Decision::Start)
            ]
        );
        assert_eq!(s.task_finished(&"a"), [sched("a", Incremental)]);
    }

    #[test]
    fn full_tasks_run_alone_up_to_the_full_limit() {
        let mut s = scheduler(limits(2, 5), &["a", "b", "c"]);
        assert_eq!(decide(&mut s, "a", Full), Decision::Start);
        assert_eq!(decide(&mut s, "b", Full), Decision::Start);
        assert_eq!(decide(&mut s, "c", Full), Decision::Queue);
        let mut one = scheduler(Limits::default(), &["a", "b"]);
        assert_eq!(decide(&mut one, "a", Full), Decision::Start);
        assert_eq!(decide(&mut one, "b", Full), Decision::Queue);
    }

    #[test]
    fn incremental_tasks_of_different_links_share_the_incremental_limit() {
        let links = ["a", "b", "c", "d", "e", "f"];
        let mut s = scheduler(Limits::default(), &links);
        for &link in &links[..5] {
            assert_eq!(decide(&mut s, link, Incremental), Decision::Start);
        }
        assert_eq!(decide(&mut s, "f", Incremental), Decision::Queue);
        assert_eq!(s.running().len(), 5);
    }

    #[test]
    fn full_and_incremental_never_run_at_the_same_time() {
        let mut s = scheduler(limits(3, 5), &["a", "b", "c"]);
        assert_eq!(decide(&mut s, "a", Incremental), Decision::Start);
        assert_eq!(decide(&mut s, "b", Full), Decision::Queue);
        s.task_finished(&"a");
        assert_eq!(running(&s), [("b", Full)]);
        assert_eq!(decide(&mut s, "c", Incremental), Decision::Queue);
    }

    #[test]
    fn task_beyond_the_limit_waits_in_due_order_and_starts_when_a_running_task_ends() {
        let mut s = scheduler(limits(1, 1), &["a", "b", "c"]);
        decide(&mut s, "a", Incremental);
        decide(&mut s, "b", Incremental);
        decide(&mut s, "c", Incremental);
        assert_eq!(queued(&s), [("b", Incremental), ("c", Incremental)]);
        assert_eq!(s.task_finished(&"a"), [sched("b", Incremental)]);
        assert_eq!(s.task_finished(&"b"), [sched("c", Incremental)]);
    }

    #[test]
    fn queued_task_of_a_busy_link_does_not_block_others() {
        let mut s = scheduler(limits(1, 2), &["a", "b", "c"]);
        decide(&mut s, "a", Incremental);
        decide(&mut s, "b", Incremental);
        assert_eq!(decide(&mut s, "a", Full), Decision::Queue);
        // Drain the full so the queue holds a task of a busy link only.
        s.task_finished(&"b");
        assert_eq!(queued(&s), [("a", Full)]);
        assert_eq!(decide(&mut s, "c", Incremental), Decision::Start);
    }

    #[test]
    fn queued_task_blocked_by_the_limits_blocks_later_tasks() {
        let mut s = scheduler(limits(1, 2), &["a", "b", "c", "d"]);
        decide(&mut s, "a", Incremental);
        assert_eq!(decide(&mut s, "b", Full), Decision::Queue);
        // A slot for incrementals is free, but the full task came due first.
        assert_eq!(decide(&mut s, "c", Incremental), Decision::Queue);
        assert_eq!(s.task_finished(&"a"), [sched("b", Full)]);
        assert_eq!(s.task_finished(&"b"), [sched("c", Incremental)]);
    }

    #[test]
    fn scheduled_task_needs_an_integrity_check() {
        let mut s = scheduler(Limits::default(), &[]);
        s.set_gates(
            "a",
            LinkGates {
                integrity_checked: false,
                ..OPEN
            },
        );
        assert_eq!(
            decide(&mut s, "a", Full),
            Decision::Drop(DropReason::IntegrityCheckPending)
        );
    }

    #[test]
    fn scheduled_task_needs_the_link_set_to_automatic() {
        let mut s = scheduler(Limits::default(), &[]);
        s.set_gates(
            "a",
            LinkGates {
                automatic: false,
                ..OPEN
            },
        );
        assert_eq!(
            decide(&mut s, "a", Full),
            Decision::Drop(DropReason::NotAutomatic)
        );
    }

    #[test]
    fn scheduled_task_needs_the_link_enabled() {
        let mut s = scheduler(Limits::default(), &[]);
        s.set_gates(
            "a",
            LinkGates {
                enabled: false,
                ..OPEN
            },
        );
        assert_eq!(
            decide(&mut s, "a", Full),
            Decision::Drop(DropReason::LinkDisabled)
        );
    }

    #[test]
    fn manual_task_bypasses_the_automatic_and_integrity_check_gates() {
        let mut s = scheduler(Limits::default(), &[]);
        let gates = LinkGates {
            enabled: true,
            automatic: false,
            integrity_checked: false,
        };
        s.set_gates("a", gates);
        assert_eq!(
            decide_task(&mut s, Task::new("a", Full, Manual)),
            Decision::Start
        );
    }

    #[test]
    fn manual_task_still_needs_the_link_enabled() {
        let mut s = scheduler(Limits::default(), &[]);
        s.set_gates(
            "a",
            LinkGates {
                enabled: false,
                ..OPEN
            },
        );
        assert_eq!(
            decide_task(&mut s, Task::new("a", Full, Manual)),
            Decision::Drop(DropReason::LinkDisabled)
        );
    }

    #[test]
    fn task_of_an_unknown_link_is_dropped() {
        let mut s = scheduler(Limits::default(), &["a"]);
        assert_eq!(
            decide_task(&mut s, Task::new("z", Full, Manual)),
            Decision::Drop(DropReason::UnknownLink)
        );
    }

    #[test]
    fn disabling_a_link_removes_its_queued_tasks_and_running_ones_finish() {
        let mut s = scheduler(Limits::default(), &["a", "b"]);
        decide(&mut s, "a", Incremental);
        decide(&mut s, "a", Full);
        decide(&mut s, "b", Full);
        let change = s.set_gates(
            "a",
            LinkGates {
                enabled: false,
                ..OPEN
            },
        );
        assert_eq!(
            change.dropped,
            [(sched("a", Full), DropReason::LinkDisabled)]
        );
        assert!(change.started.is_empty());
        assert_eq!(running(&s), [("a", Incremental)]);
        assert_eq!(s.task_finished(&"a"), [sched("b", Full)]);
    }

    #[test]
    fn dropping_a_blocked_queue_head_lets_the_tasks_behind_it_start() {
        let mut s = scheduler(limits(1, 2), &["a", "b", "c"]);
        decide(&mut s, "a", Incremental);
        decide(&mut s, "b", Full);
        decide(&mut s, "c", Incremental);
        let change = s.set_gates(
            "b",
            LinkGates {
                enabled: false,
                ..OPEN
            },
        );
        assert_eq!(change.started, [sched("c", Incremental)]);
    }

    #[test]
    fn losing_a_gate_drops_queued_scheduled_tasks_but_keeps_manual_ones() {
        let mut s = scheduler(Limits::default(), &["a", "b"]);
        decide(&mut s, "a", Full);
        decide(&mut s, "b", Full);
        decide_task(&mut s, Task::new("b", Incremental, Manual));
        let change = s.set_gates(
            "b",
            LinkGates {
                automatic: false,
                ..OPEN
            },
        );
        assert_eq!(
            change.dropped,
            [(sched("b", Full), DropReason::NotAutomatic)]
        );
        assert_eq!(s.queued(), [Task::new("b", Incremental, Manual)]);
    }

    #[test]
    fn removing_a_link_drops_its_queued_tasks_and_its_running_task_keeps_its_slot() {
        let mut s = scheduler(Limits::default(), &["a", "b"]);
        decide(&mut s, "a", Full);
        decide(&mut s, "a", Incremental);
        decide(&mut s, "b", Full);
        let change = s.remove_link(&"a");
        assert_eq!(
            change.dropped,
            [(sched("a", Incremental), DropReason::UnknownLink)]
        );
        assert!(change.started.is_empty());
        assert_eq!(s.gates(&"a"), None);
        assert_eq!(s.task_finished(&"a"), [sched("b", Full)]);
    }

    #[test]
    fn raising_a_limit_starts_waiting_tasks() {
        let mut s = scheduler(limits(1, 1), &["a", "b", "c"]);
        decide(&mut s, "a", Incremental);
        decide(&mut s, "b", Incremental);
        decide(&mut s, "c", Incremental);
        let started = s.set_limits(limits(1, 3));
        assert_eq!(started, [sched("b", Incremental), sched("c", Incremental)]);
        assert_eq!(s.limits(), limits(1, 3));
    }

    #[test]
    fn finishing_on_an_idle_link_changes_nothing() {
        let mut s = scheduler(Limits::default(), &["a", "b"]);
        decide(&mut s, "a", Full);
        decide(&mut s, "b", Full);
        assert!(s.task_finished(&"b").is_empty());
        assert_eq!(running(&s), [("a", Full)]);
        assert_eq!(queued(&s), [("b", Full)]);
    }

    #[test]
    fn running_and_queued_tasks_are_visible() {
        let mut s = scheduler(Limits::default(), &["a", "b"]);
        decide(&mut s, "a", Full);
        decide(&mut s, "b", Incremental);
        assert_eq!(s.running_on(&"a"), Some(&sched("a", Full)));
        assert_eq!(s.running_on(&"b"), None);
        assert_eq!(running(&s), [("a", Full)]);
        assert_eq!(queued(&s), [("b", Incremental)]);
    }

    #[test]
    fn drop_reasons_say_which_gate() {
        assert_eq!(
            DropReason::NotAutomatic.to_string(),
            "the link is not set to run automatically"
        );
        assert_eq!(
            DropReason::IntegrityCheckPending.to_string(),
            "the link has not passed an integrity check"
        );
        assert_eq!(DropReason::LinkDisabled.to_string(), "the link is disabled");
    }

    fn every(secs: u64) -> NonZeroU64 {
        NonZeroU64::new(secs).unwrap_or(NonZeroU64::MIN)
    }

    fn timetable() -> Timetable {
        Timetable {
            incremental_every: every(60),
            full_every: every(3600),
        }
    }

    #[test]
    fn timetable_kinds_never_due_before_are_due_at_once_full_first() {
        let due = timetable().due_at(LastDue::default(), 1000);
        assert_eq!(
            due,
            DueNow {
                kinds: vec![Full, Incremental],
                next_due_at: 1060
            }
        );
    }

    #[test]
    fn timetable_only_the_elapsed_kind_is_due() {
        let last = LastDue {
            incremental: Some(940),
            full: Some(500),
        };
        assert_eq!(
            timetable().due_at(last, 1000),
            DueNow {
                kinds: vec![Incremental],
                next_due_at: 1060
            }
        );
        let last = LastDue {
            incremental: Some(980),
            full: Some(500),
        };
        assert_eq!(
            timetable().due_at(last, 1000),
            DueNow {
                kinds: vec![],
                next_due_at: 1040
            }
        );
        let last = LastDue {
            incremental: Some(3590),
            full: Some(0),
        };
        assert_eq!(
            timetable().due_at(last, 3600),
            DueNow {
                kinds: vec![Full],
                next_due_at: 3650
            }
        );
    }

    #[test]
    fn timetable_missed_intervals_collapse_into_one_task() {
        let last = LastDue {
            incremental: Some(0),
            full: Some(0),
        };
        let due = timetable().due_at(last, 100_000);
        assert_eq!(
            due,
            DueNow {
                kinds: vec![Full, Incremental],
                next_due_at: 100_060
            }
        );
    }

    #[test]
    fn timetable_clock_stepped_back_postpones_by_at_most_one_interval() {
        let last = LastDue {
            incremental: Some(5000),
            full: Some(5000),
        };
        assert_eq!(
            timetable().due_at(last, 1000),
            DueNow {
                kinds: vec![],
                next_due_at: 1060
            }
        );
    }

    #[test]
    fn timetable_saturates_at_the_end_of_time() {
        let table = Timetable {
            incremental_every: every(10),
            full_every: every(u64::MAX),
        };
        let due = table.due_at(
            LastDue {
                incremental: Some(95),
                full: Some(1),
            },
            100,
        );
        assert_eq!(
            due,
            DueNow {
                kinds: vec![],
                next_due_at: 105
            }
        );
        let due = table.due_at(
            LastDue {
                incremental: None,
                full: None,
            },
            u64::MAX - 5,
        );
        assert_eq!(
            due,
            DueNow {
                kinds: vec![Full, Incremental],
                next_due_at: u64::MAX
            }
        );
    }

    // ---- properties over random event sequences ----

    const LINKS: u8 = 8;

    #[derive(Debug, Clone)]
    enum Event {
        Due(Vec<Task<u8>>),
        Finish(u8),
        SetGates(u8, LinkGates),
        Disable(u8),
        Remove(u8),
    }

    #[derive(Debug, Clone)]
    struct Scenario {
        limits: Limits,
        gates: Vec<(u8, LinkGates)>,
        events: Vec<Event>,
    }

    fn gates_strategy() -> impl Strategy<Value = LinkGates> {
        let mostly = || proptest::bool::weighted(0.85);
        (mostly(), mostly(), mostly()).prop_map(|(enabled, automatic, integrity_checked)| {
            LinkGates {
                enabled,
                automatic,
                integrity_checked,
            }
        })
    }

    fn task_strategy() -> impl Strategy<Value = Task<u8>> {
        let kind = prop_oneof![Just(Incremental), Just(Full)];
        let trigger = prop_oneof![3 => Just(Scheduled), 1 => Just(Manual)];
        (0..LINKS, kind, trigger).prop_map(|(link, kind, trigger)| Task::new(link, kind, trigger))
    }

    fn event_strategy() -> impl Strategy<Value = Event> {
        prop_oneof![
            10 => proptest::collection::vec(task_strategy(), 1..4).prop_map(Event::Due),
            8 => (0..LINKS).prop_map(Event::Finish),
            2 => (0..LINKS, gates_strategy()).prop_map(|(l, g)| Event::SetGates(l, g)),
            1 => (0..LINKS).prop_map(Event::Disable),
            1 => (0..LINKS).prop_map(Event::Remove),
        ]
    }

    fn scenario_strategy() -> impl Strategy<Value = Scenario> {
        (
            1..=3u32,
            1..=6u32,
            proptest::collection::vec(gates_strategy(), 1..=usize::from(LINKS)),
            proptest::collection::vec(event_strategy(), 1..80),
        )
            .prop_map(|(full, incremental, gates, events)| Scenario {
                limits: limits(full, incremental),
                gates: (0..).zip(gates).collect(),
                events,
            })
    }

    /// What one event did, as seen from outside the scheduler.
    struct Step<'a> {
        event: &'a Event,
        limits: Limits,
        /// The gates as the test itself tracks them, after the event.
        gates: &'a BTreeMap<u8, LinkGates>,
        running_before: Vec<Task<u8>>,
        queued_before: Vec<Task<u8>>,
        running: Vec<Task<u8>>,
        queued: Vec<Task<u8>>,
        decisions: Vec<(Task<u8>, Decision)>,
        started: Vec<Task<u8>>,
        dropped: Vec<(Task<u8>, DropReason)>,
    }

    /// Runs a scenario and hands every step to `check`.
    fn run(
        scenario: &Scenario,
        mut check: impl FnMut(&Step<'_>) -> Result<(), TestCaseError>,
    ) -> Result<(), TestCaseError> {
        let mut s = Scheduler::new(scenario.limits);
        let mut gates = BTreeMap::new();
        for &(link, g) in &scenario.gates {
            s.set_gates(link, g);
            gates.insert(link, g);
        }
        for event in &scenario.events {
            let running_before = s.running().to_vec();
            let queued_before = s.queued().to_vec();
            let (mut decisions, mut started, mut dropped) = (Vec::new(), Vec::new(), Vec::new());
            match event {
                Event::Due(tasks) => decisions = s.tasks_due(tasks.iter().cloned()),
                Event::Finish(link) => started = s.task_finished(link),
                Event::SetGates(link, g) => {
                    gates.insert(*link, *g);
                    let change = s.set_gates(*link, *g);
                    (started, dropped) = (change.started, change.dropped);
                }
                Event::Disable(link) => {
                    // Disabling an unknown link would register it; only known links get disabled.
                    if let Some(g) = gates.get_mut(link) {
                        g.enabled = false;
                        let change = s.set_gates(*link, *g);
                        (started, dropped) = (change.started, change.dropped);
                    }
                }
                Event::Remove(link) => {
                    gates.remove(link);
                    let change = s.remove_link(link);
                    (started, dropped) = (change.started, change.dropped);
                }
            }
            check(&Step {
                event,
                limits: scenario.limits,
                gates: &gates,
                running_before,
                queued_before,
                running: s.running().to_vec(),
                queued: s.queued().to_vec(),
                decisions,
                started,
                dropped,
            })?;
        }
        Ok(())
    }

    fn passes(gates: &BTreeMap<u8, LinkGates>, task: &Task<u8>) -> bool {
        gates.get(&task.link).is_some_and(|g| {
            g.enabled && (task.trigger == Manual || (g.automatic && g.integrity_checked))
        })
    }

    fn count(tasks: &[Task<u8>], kind: TaskKind) -> u32 {
        u32::try_from(tasks.iter().filter(|t| t.kind == kind).count()).unwrap_or(u32::MAX)
    }

    /// The limits rule, stated independently of the scheduler.
    fn fits(running: &[Task<u8>], limits: Limits, kind: TaskKind) -> bool {
        let (full, incremental) = (count(running, Full), count(running, Incremental));
        match kind {
            Full => incremental == 0 && full < limits.max_concurrent_full.get(),
            Incremental => full == 0 && incremental < limits.max_concurrent_incremental.get(),
        }
    }

    fn holds(tasks: &[Task<u8>], link: u8, kind: TaskKind) -> bool {
        tasks.iter().any(|t| t.link == link && t.kind == kind)
    }

    fn is_subsequence(short: &[Task<u8>], long: &[Task<u8>]) -> bool {
        let mut rest = long.iter();
        short.iter().all(|wanted| rest.any(|t| t == wanted))
    }

    fn without(tasks: &[Task<u8>], gone: &[Task<u8>]) -> Vec<Task<u8>> {
        tasks
            .iter()
            .filter(|t| !gone.contains(t))
            .cloned()
            .collect()
    }

    fn check_invariants(step: &Step<'_>) -> Result<(), TestCaseError> {
        let links: BTreeSet<u8> = step.running.iter().map(|t| t.link).collect();
        prop_assert_eq!(
            links.len(),
            step.running.len(),
            "two tasks on one link: {:?}",
            step.running
        );
        let (full, incremental) = (
            count(&step.running, Full),
            count(&step.running, Incremental),
        );
        prop_assert!(
            full == 0 || incremental == 0,
            "full beside incremental: {:?}",
            step.running
        );
        prop_assert!(full <= step.limits.max_concurrent_full.get());
        prop_assert!(incremental <= step.limits.max_concurrent_incremental.get());
        for (i, task) in step.queued.iter().enumerate() {
            prop_assert!(
                !holds(&step.queued[i + 1..], task.link, task.kind),
                "queued twice: {:?}",
                step.queued
            );
            prop_assert!(
                !holds(&step.running, task.link, task.kind),
                "queued while the same runs: {:?}",
                task
            );
            prop_assert!(
                passes(step.gates, task),
                "queued on a closed or unknown link: {:?}",
                task
            );
        }
        // Work conserving: the first queued task whose link is idle cannot start.
        if let Some(head) = step
            .queued
            .iter()
            .find(|t| !step.running.iter().any(|r| r.link == t.link))
        {
            prop_assert!(
                !fits(&step.running, step.limits, head.kind),
                "{:?} could start beside {:?}",
                head,
                step.running
            );
        }
        Ok(())
    }

    fn check_decisions(step: &Step<'_>) -> Result<(), TestCaseError> {
        let newly_running = without(&step.running, &step.running_before);
        let finished = without(&step.running_before, &step.running);
        match step.event {
            Event::Finish(link) => {
                prop_assert!(finished.iter().all(|t| t.link == *link));
                prop_assert!(finished.len() <= 1);
            }
            _ => prop_assert!(finished.is_empty(), "a task ended unasked: {:?}", finished),
        }
        for task in &newly_running {
            let was_queued = step.queued_before.contains(task);
            let started_now = step.decisions.contains(&(task.clone(), Decision::Start));
            prop_assert!(
                was_queued || started_now,
                "started without coming due: {:?}",
                task
            );
            prop_assert!(
                passes(step.gates, task),
                "started on a closed link: {:?}",
                task
            );
        }
        if let Event::Due(tasks) = step.event {
            prop_assert_eq!(
                step.decisions
                    .iter()
                    .map(|(t, _)| t.clone())
                    .collect::<Vec<_>>(),
                tasks.clone()
            );
            let starts: Vec<Task<u8>> = step
                .decisions
                .iter()
                .filter(|(_, d)| *d == Decision::Start)
                .map(|(t, _)| t.clone())
                .collect();
            prop_assert_eq!(&newly_running, &starts);
            // Coming due frees nothing, so nothing already queued can start or go.
            prop_assert!(step.queued_before.iter().all(|t| step.queued.contains(t)));
            for (task, decision) in &step.decisions {
                match decision {
                    Decision::Start => prop_assert!(step.running.contains(task)),
                    Decision::Queue => prop_assert!(step.queued.contains(task)),
                    Decision::Drop(reason) => check_reason(step, task, *reason, true)?,
                }
            }
        } else {
            prop_assert_eq!(&newly_running, &step.started);
            // Every queued task that vanished without starting is reported dropped, and
            // every reported drop was queued and is gone.
            let gone = without(&without(&step.queued_before, &step.queued), &step.started);
            let reported: Vec<Task<u8>> = step.dropped.iter().map(|(t, _)| t.clone()).collect();
            prop_assert_eq!(gone, reported);
            for (task, reason) in &step.dropped {
                check_reason(step, task, *reason, false)?;
            }
        }
        Ok(())
    }

    fn check_reason(
        step: &Step<'_>,
        task: &Task<u8>,
        reason: DropReason,
        on_arrival: bool,
    ) -> Result<(), TestCaseError> {
        let gates = step.gates.get(&task.link);
        let scheduled = task.trigger == Scheduled;
        let true_reason = match reason {
            DropReason::UnknownLink => gates.is_none(),
            DropReason::LinkDisabled => gates.is_some_and(|g| !g.enabled),
            DropReason::NotAutomatic => scheduled && gates.is_some_and(|g| !g.automatic),
            DropReason::IntegrityCheckPending => {
                scheduled && gates.is_some_and(|g| !g.integrity_checked)
            }
            DropReason::SameTypeRunning => on_arrival && holds(&step.running, task.link, task.kind),
            DropReason::SameTypeQueued => on_arrival && holds(&step.queued, task.link, task.kind),
        };
        prop_assert!(
            true_reason,
            "{:?} dropped for {:?}, gates {:?}",
            task,
            reason,
            gates
        );
        Ok(())
    }

    fn check_due_order(step: &Step<'_>) -> Result<(), TestCaseError> {
        let mut arrivals = step.queued_before.clone();
        if let Event::Due(tasks) = step.event {
            // Full tasks of one instant are taken first, then incremental ones.
            let (fulls, incrementals): (Vec<_>, Vec<_>) =
                tasks.iter().cloned().partition(|t| t.kind == Full);
            arrivals.extend(fulls);
            arrivals.extend(incrementals);
        }
        prop_assert!(
            is_subsequence(&step.queued, &arrivals),
            "queue {:?} out of due order {:?}",
            step.queued,
            arrivals
        );
        // Tasks start in due order too: whatever started, nothing still queued ahead
        // of it had an idle link and room.
        for started in without(&step.running, &step.running_before) {
            if let Some(pos) = arrivals.iter().position(|t| *t == started) {
                for ahead in arrivals[..pos].iter().filter(|t| step.queued.contains(t)) {
                    prop_assert!(
                        step.running
                            .iter()
                            .any(|r| r.link == ahead.link && *r != started),
                        "{:?} started ahead of {:?}",
                        started,
                        ahead
                    );
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn invariants_hold_after_every_event(scenario in scenario_strategy()) {
            run(&scenario, check_invariants)?;
        }

        #[test]
        fn every_start_and_drop_is_justified(scenario in scenario_strategy()) {
            run(&scenario, check_decisions)?;
        }

        #[test]
        fn tasks_queue_and_start_in_due_order(scenario in scenario_strategy()) {
            run(&scenario, check_due_order)?;
        }
    }

    // ---- groups: the families of one operator ----

    /// Links named "family/link"; the family is the group.
    fn family_of(link: &&'static str) -> &'static str {
        link.split_once('/').map_or(*link, |(family, _)| family)
    }

    fn grouped(limits: Limits, links: &[&'static str]) -> Scheduler<&'static str, &'static str> {
        let mut s = Scheduler::grouped(limits, family_of);
        for &link in links {
            s.set_gates(link, OPEN);
        }
        s
    }

    /// Three families under one operator: their full tasks run one at a time, whatever
    /// each family allows on its own.
    #[test]
    fn families_share_the_operators_full_task_limit() {
        let mut s = grouped(Limits::default(), &["a/1", "b/1", "c/1"]);
        for family in ["a", "b", "c"] {
            s.set_group_limits(family, Some(limits(3, 5)));
        }
        let due = ["a/1", "b/1", "c/1"].map(|l| Task::new(l, Full, Scheduled));
        let decisions: Vec<Decision> = s.tasks_due(due).into_iter().map(|(_, d)| d).collect();
        assert_eq!(
            decisions,
            [Decision::Start, Decision::Queue, Decision::Queue]
        );
        for (finished, next) in [("a/1", "b/1"), ("b/1", "c/1")] {
            let started = s.task_finished(&finished);
            assert_eq!(started, [Task::new(next, Full, Scheduled)]);
            assert_eq!(s.running().len(), 1);
        }
    }

    /// A family's own limits narrow the operator's for its links only: a task its
    /// family holds back does not hold up another family's.
    #[test]
    fn a_familys_narrower_limits_hold_back_only_its_own_tasks() {
        let mut s = grouped(Limits::default(), &["a/1", "a/2", "b/1"]);
        s.set_group_limits("a", Some(limits(1, 1)));
        let due = ["a/1", "a/2", "b/1"].map(|l| Task::new(l, Incremental, Scheduled));
        let decisions: Vec<Decision> = s.tasks_due(due).into_iter().map(|(_, d)| d).collect();
        assert_eq!(
            decisions,
            [Decision::Start, Decision::Queue, Decision::Start]
        );
        assert_eq!(
            s.task_finished(&"a/1"),
            [Task::new("a/2", Incremental, Scheduled)]
        );
        // Clearing the family's limits lets the operator's alone hold.
        let mut s = grouped(Limits::default(), &["a/1", "a/2"]);
        s.set_group_limits("a", Some(limits(1, 1)));
        s.tasks_due(["a/1", "a/2"].map(|l| Task::new(l, Incremental, Scheduled)));
        assert_eq!(s.running().len(), 1);
        assert_eq!(
            s.set_group_limits("a", None),
            [Task::new("a/2", Incremental, Scheduled)]
        );
        assert_eq!(s.group_limits(&"a"), None);
        // The operator's limits still hold over a family's wider ones.
        let mut s = grouped(limits(1, 2), &["a/1", "a/2", "a/3"]);
        s.set_group_limits("a", Some(limits(1, 5)));
        let due = ["a/1", "a/2", "a/3"].map(|l| Task::new(l, Incremental, Scheduled));
        let decisions: Vec<Decision> = s.tasks_due(due).into_iter().map(|(_, d)| d).collect();
        assert_eq!(
            decisions,
            [Decision::Start, Decision::Start, Decision::Queue]
        );
    }

    #[derive(Debug, Clone)]
    struct GroupedScenario {
        limits: Limits,
        /// The own limits of groups 0, 1, 2 (link % 3), where set.
        groups: [Option<Limits>; 3],
        events: Vec<Event>,
    }

    fn grouped_scenario_strategy() -> impl Strategy<Value = GroupedScenario> {
        let own = || proptest::option::of((1..=2u32, 1..=4u32).prop_map(|(f, i)| limits(f, i)));
        (
            1..=3u32,
            1..=6u32,
            own(),
            own(),
            own(),
            proptest::collection::vec(event_strategy(), 1..80),
        )
            .prop_map(|(full, incremental, g0, g1, g2, events)| GroupedScenario {
                limits: limits(full, incremental),
                groups: [g0, g1, g2],
                events,
            })
    }

    fn group_of_link(link: &u8) -> u8 {
        link % 3
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Over random events with every link open: the overall limits and each group's
        /// own always hold, and after every event the first queued task that is neither
        /// on a busy link nor held back by its group alone is held back by the overall
        /// limits (else it would have started: no task waits for nothing).
        #[test]
        fn groups_narrow_the_limits_and_never_hold_up_each_other(scenario in grouped_scenario_strategy()) {
            let mut s = Scheduler::grouped(scenario.limits, group_of_link);
            for link in 0..LINKS {
                s.set_gates(link, OPEN);
            }
            for (group, own) in (0u8..).zip(scenario.groups) {
                s.set_group_limits(group, own);
            }
            for event in &scenario.events {
                match event {
                    Event::Due(tasks) => { s.tasks_due(tasks.iter().cloned()); }
                    Event::Finish(link) => { s.task_finished(link); }
                    // Gates and removal are covered above; here every link stays open.
                    Event::SetGates(..) | Event::Disable(_) | Event::Remove(_) => {}
                }
                let running = s.running().to_vec();
                prop_assert!(fits_or_at(&running, scenario.limits), "overall: {:?}", running);
                for (group, own) in (0u8..).zip(scenario.groups) {
                    let in_group: Vec<Task<u8>> = running.iter().filter(|t| group_of_link(&t.link) == group).cloned().collect();
                    if let Some(own) = own {
                        prop_assert!(fits_or_at(&in_group, own), "group {}: {:?}", group, in_group);
                    }
                }
                // Passed over are tasks whose link is busy, and tasks that the overall
                // limits would let run but their group's do not.
                let group_room = |t: &Task<u8>| {
                    scenario.groups[usize::from(group_of_link(&t.link))].is_none_or(|own| {
                        let in_group: Vec<Task<u8>> = running
                            .iter()
                            .filter(|r| group_of_link(&r.link) == group_of_link(&t.link))
                            .cloned()
                            .collect();
                        fits(&in_group, own, t.kind)
                    })
                };
                let first_free = s.queued().iter().find(|t| {
                    !running.iter().any(|r| r.link == t.link)
                        && (!fits(&running, scenario.limits, t.kind) || group_room(t))
                });
                if let Some(task) = first_free {
                    prop_assert!(
                        !fits(&running, scenario.limits, task.kind),
                        "{:?} waits for nothing beside {:?}", task, running
                    );
                }
            }
        }
    }

    /// `running` is within `limits`: full tasks alone, each kind at most its limit.
    fn fits_or_at(running: &[Task<u8>], limits: Limits) -> bool {
        let (full, incremental) = (count(running, Full), count(running, Incremental));
        (full == 0 || incremental == 0)
            && full <= limits.max_concurrent_full.get()
            && incremental <= limits.max_concurrent_incremental.get()
    }
}
