//! Two standalone Tessera servers side by side, no cluster between them: the cluster
//! scenario's control. Each server gets its own publisher and the subscribers of that
//! publisher, so nothing crosses between them; on the same CPUs and budgets as the two
//! webrtc nodes, the pair shows what this machine lets two independent servers carry,
//! and the cluster's two nodes are judged against that as well as against one node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tessera_client::peer::Publisher;

use super::tessera::Tessera;
use super::{Keep, Launch, PeerKind, Server, Sub};

/// Two running servers; both stop when it is dropped.
pub struct Pair {
    servers: [Tessera; 2],
    /// Which server each publication is on (its subscribers go there too).
    home: Mutex<HashMap<String, usize>>,
    /// Publications so far: they go to the servers in turn.
    published: AtomicUsize,
}

impl Pair {
    /// Starts one server with each launch (its CPU and budget).
    pub fn start(launches: [&Launch; 2]) -> anyhow::Result<Pair> {
        let servers = [Tessera::start(launches[0])?, Tessera::start(launches[1])?];
        Ok(Pair { servers, home: Mutex::new(HashMap::new()), published: AtomicUsize::new(0) })
    }
}

impl Server for Pair {
    fn pid(&self) -> u32 {
        self.servers[0].pid()
    }
    fn pids(&self) -> Vec<u32> {
        self.servers.iter().map(Server::pid).collect()
    }
    async fn publish(&self, user: &str, tag: u32) -> anyhow::Result<(Arc<Publisher>, Keep)> {
        let i = self.published.fetch_add(1, Ordering::Relaxed) % 2;
        let (p, keep) = self.servers[i].publish(user, tag).await?;
        self.home.lock().unwrap_or_else(|e| e.into_inner()).insert(p.stream_id.clone(), i);
        Ok((p, keep))
    }
    async fn subscribe(&self, user: &str, stream: &str, peer: PeerKind) -> anyhow::Result<(Sub, Keep)> {
        let i = self.home.lock().unwrap_or_else(|e| e.into_inner()).get(stream).copied();
        let i = i.with_context(|| format!("stream {stream} was not published on either server"))?;
        self.servers[i].subscribe(user, stream, peer).await
    }
}
