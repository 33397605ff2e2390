//! The members file: a JSON array of `{"node_id", "peer_id", "addrs"}`, watched so that a
//! change reaches the membership as fast as the file system reports it. Until it does,
//! this node refuses a new member's requests, and that member waits.

use std::{path::PathBuf, time::Duration};

use gantry_coord::{Member, StaticMembership};
use libp2p::{Multiaddr, PeerId};
use notify::{RecursiveMode, Watcher};
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
        let ours = event.is_ok_and(|e| {
            e.paths
                .iter()
                .any(|p| p.file_name().map(|n| n.to_owned()) == name)
        });
        if ours {
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
