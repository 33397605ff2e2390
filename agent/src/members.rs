//! The members file: a JSON array of `{"node_id", "peer_id", "addrs"}`, watched so that a
//! change reaches the membership as fast as the file system reports it. Until it does,
//! this node refuses a new member's requests, and that member waits.

use std::{path::PathBuf, time::Duration};

use gantry_coord::{Member, StaticMembership};
use libp2p::{Multiaddr, PeerId};
use notify::{
    event::{AccessKind, AccessMode, EventKind, ModifyKind},
    RecursiveMode, Watcher,
};
use tokio::sync::mpsc;

use super::Control;

/// Members' addresses, to dial and to give Kademlia.
pub type Addresses = Vec<(PeerId, Multiaddr)>;

/// How often the file is looked at when no watcher can be had, and at most how long a
/// missed event goes unnoticed when one can.
const POLL: Duration = Duration::from_secs(2);

#[derive(Debug, serde::Deserialize)]
struct MemberEntry {
    node_id: String,
    peer_id: String,
    #[serde(default)]
    addrs: Vec<Multiaddr>,
}

pub fn read_members(path: &PathBuf) -> Result<(Vec<Member>, Addresses), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let entries: Vec<MemberEntry> =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut members = Vec::new();
    let mut addresses = Vec::new();
    for entry in entries {
        let peer: PeerId = entry
            .peer_id
            .parse()
            .map_err(|e| format!("peer id of {}: {e}", entry.node_id))?;
        addresses.extend(entry.addrs.into_iter().map(|a| (peer, a)));
        members.push(Member::new(entry.node_id.as_str(), Some(peer)));
    }
    Ok((members, addresses))
}

/// Whether `event` may have changed the file called `name`. Opening and reading it (as
/// the re-read itself does) are events too: counted, they would have every node that
/// watches the directory read the file again, and again, without end.
fn changes_file(event: &notify::Event, name: Option<&std::ffi::OsStr>) -> bool {
    let kind = match event.kind {
        EventKind::Modify(kind) => !matches!(kind, ModifyKind::Metadata(_)),
        // A writer done with it.
        EventKind::Access(kind) => kind == AccessKind::Close(AccessMode::Write),
        EventKind::Create(_) | EventKind::Remove(_) | EventKind::Any | EventKind::Other => true,
    };
    kind && event.paths.iter().any(|p| p.file_name() == name)
}

/// Re-reads `path` whenever its directory reports a change to it (a write in place or a
/// rename over it, as a Kubernetes volume does), and every [`POLL`] in case an event was
/// missed; a list other than `known` (what the node runs with) goes to `membership`
/// and its addresses to the swarm loop. A file caught half written is read again at the
/// next event.
pub async fn follow(
    path: PathBuf,
    known: (Vec<Member>, Addresses),
    membership: StaticMembership,
    control: mpsc::UnboundedSender<Control>,
) {
    let (changed, mut changes) = mpsc::channel::<()>(1);
    let name = path.file_name().map(|n| n.to_owned());
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), PathBuf::from);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| changes_file(&e, name.as_deref())) {
            // One pending wake-up is enough: the read sees the latest content.
            let _ = changed.try_send(());
        }
    })
    .and_then(|mut watcher| {
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        Ok(watcher)
    });
    let _watcher = match watcher {
        Ok(watcher) => Some(watcher),
        Err(error) => {
            tracing::warn!(%error, "members file not watched: polling it");
            None
        }
    };
    let mut known = known;
    loop {
        let _ = tokio::time::timeout(POLL, changes.recv()).await;
        match read_members(&path) {
            Ok(read) if read != known => {
                tracing::info!(members = read.0.len(), "members file changed");
                known = read.clone();
                let (members, addresses) = read;
                membership.set_members(members);
                let _ = control.send(Control::Members(addresses));
            }
            Ok(_) => {}
            Err(error) => tracing::debug!(%error, "members file not read (yet)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use notify::event::{CreateKind, DataChange, MetadataKind, RenameMode};

    use super::*;

    fn event(kind: EventKind, file: &str) -> notify::Event {
        notify::Event::new(kind).add_path(PathBuf::from("/etc/gantry").join(file))
    }

    #[test]
    fn only_a_change_to_the_members_file_is_one() {
        let name = Some(std::ffi::OsStr::new("members.json"));
        let changes = [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Content)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Remove(notify::event::RemoveKind::File),
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
        ];
        for kind in changes {
            assert!(changes_file(&event(kind, "members.json"), name), "{kind:?}");
            assert!(!changes_file(&event(kind, "agent.log"), name), "{kind:?}");
        }
        // The node's own re-read opens, reads and closes the file.
        let reads = [
            EventKind::Access(AccessKind::Open(AccessMode::Read)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime)),
        ];
        for kind in reads {
            assert!(
                !changes_file(&event(kind, "members.json"), name),
                "{kind:?}"
            );
        }
    }
}
