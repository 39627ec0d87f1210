//! Network namespaces a test builds for itself: a bridge namespace with two bridges (`br0`,
//! where every node starts, and `br1`, for partitions) and one namespace per node at
//! 10.77.0.(i+1)/24, joined by veth pairs created *inside* the namespaces (the host's
//! interfaces are never touched, and no packet leaves them). Dropped → deleted.

use std::process::Command;

/// The namespaces; deleted on drop.
pub struct Namespaces {
    names: Vec<String>,
    bridge: String,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

impl Namespaces {
    /// Moves node `i`'s port to bridge `br` (0 or 1): nodes on different bridges cannot
    /// reach each other, so this partitions and heals.
    pub fn attach(&self, i: usize, br: u8) -> Result<(), String> {
        let port = format!("p{i}");
        let master = format!("br{br}");
        in_ns(&self.bridge, &["link", "set", &port, "master", &master])
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn in_ns(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut a = vec!["netns", "exec", ns, "ip"];
    a.extend_from_slice(args);
    ip(&a)
}

/// Builds the namespaces of `n` nodes (all on `br0`) and returns them with the nodes'
/// namespace names; Err(reason) where that is not permitted here.
pub fn build(n: usize) -> Result<(Namespaces, Vec<String>), String> {
    static BUILT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let k = BUILT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let tag = format!("{}-{k}", std::process::id() % 100_000);
    let bridge = format!("shoal-br-{tag}");
    let mut guard = Namespaces {
        names: vec![],
        bridge: bridge.clone(),
    };
    ip(&["netns", "add", &bridge])?;
    guard.names.push(bridge.clone());
    for br in ["br0", "br1"] {
        in_ns(&bridge, &["link", "add", br, "type", "bridge"])?;
        in_ns(&bridge, &["link", "set", br, "up"])?;
    }
    let mut nodes = Vec::new();
    for i in 0..n {
        let ns = format!("shoal-n{i}-{tag}");
        ip(&["netns", "add", &ns])?;
        guard.names.push(ns.clone());
        let port = format!("p{i}");
        in_ns(
            &bridge,
            &[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        in_ns(&bridge, &["link", "set", &port, "master", "br0"])?;
        in_ns(&bridge, &["link", "set", &port, "up"])?;
        let addr = format!("10.77.0.{}/24", i + 1);
        in_ns(&ns, &["addr", "add", &addr, "dev", "eth0"])?;
        in_ns(&ns, &["link", "set", "eth0", "up"])?;
        in_ns(&ns, &["link", "set", "lo", "up"])?;
        in_ns(&ns, &["route", "add", "224.0.0.0/4", "dev", "eth0"])?;
        nodes.push(ns);
    }
    Ok((guard, nodes))
}
