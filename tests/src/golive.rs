//! The go-live stack of issue 17 §6, assembled from [`crate::stack`] and [`crate::web`]: a
//! [`TestCluster`] of agents, one nginx per server serving its site's `current`, HAProxy in
//! front of them (the manager's load-balancer plugin granted its runtime API), and — with a
//! cache — Varnish in front of HAProxy, sessions kept on their pinned server's copies
//! ([`varnish_vcl_pinned`]). Every agent's `[[caches]]` names the Varnish invalidator, so
//! whichever agent leads the segment purges it after a commit. `golive_rolling` proves with
//! it; `golive_bench` measures with it.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde_json::{Value, json};

use crate::cluster::{Layout, TestCluster};
use crate::stack::{Haproxy, Nginx, free_port};
use crate::web::{Varnish, varnish_vcl_pinned};

/// The `Host` every request of the stack carries (and the caches purge).
pub const HOST: &str = "www";

pub struct GoLiveStack {
    pub cluster: TestCluster,
    /// Server `i`'s nginx (the cluster's agent `i`).
    pub nginx: Vec<Nginx>,
    pub haproxy: Haproxy,
    pub varnish: Option<Varnish>,
    /// Agent name → its nginx's address: HAProxy's servers, the site's `golive.servers`.
    pub servers: BTreeMap<String, String>,
}

impl GoLiveStack {
    /// Starts it all; `None` when a part is not installed (reported by [`crate::missing_part`]).
    pub async fn start(
        mut layout: Layout,
        site: &Path,
        with_varnish: bool,
    ) -> anyhow::Result<Option<GoLiveStack>> {
        // Varnish's backend is HAProxy's frontend, chosen now; HAProxy starts once the agents'
        // nginx are up, and the agents need Varnish's address in their config.
        let front = format!("127.0.0.1:{}", free_port());
        let varnish = if with_varnish {
            let Some(v) = Varnish::start(&varnish_vcl_pinned(&front, "SRV"))? else {
                return Ok(None);
            };
            let caches = format!("[[caches]]\nplugin = \"varnish\"\nhost = \"{HOST}\"\n");
            let before = layout.tweak.take();
            layout.tweak = Some(Box::new(move |n, spec| {
                if let Some(t) = &before {
                    t(n, spec);
                }
                spec.extra_toml += &caches;
            }));
            Some(v)
        } else {
            None
        };
        let cluster = TestCluster::start(&layout, site).await?;
        let mut nginx = Vec::new();
        for a in &cluster.agents {
            let Some(n) = Nginx::start(&a.site_root, "")? else {
                crate::missing_part("nginx not installed (the go-live stack)");
                return Ok(None);
            };
            nginx.push(n);
        }
        let servers: BTreeMap<String, String> = cluster
            .agents
            .iter()
            .zip(&nginx)
            .map(|(a, n)| (a.spec.name.clone(), n.address.clone()))
            .collect();
        let Some(haproxy) = Haproxy::start_on(&front, &servers)? else {
            crate::missing_part("haproxy not installed (the go-live stack)");
            return Ok(None);
        };
        let stack = GoLiveStack { cluster, nginx, haproxy, varnish, servers };
        // The manager's load balancer: the bundled HAProxy plugin in its own plugin store,
        // granted this HAProxy's socket.
        let manager_store =
            cm_manager::golive::store_dir(&stack.cluster.dir.path().join("manager"));
        stack.install("haproxy", &stack.haproxy.plugin_manifest("lb"), &manager_store)?;
        if let Some(v) = &stack.varnish {
            let manifest = format!(
                "name = \"varnish\"\nworld = \"cache-invalidator\"\n[grants.endpoints.edge]\nhttp = \"{}\"\ntimeout-ms = 5000\n",
                v.address
            );
            for a in &stack.cluster.agents {
                stack.install("varnish", &manifest, &a.dir.join("plugins"))?;
            }
        }
        Ok(Some(stack))
    }

    /// `plugins/dist/<plugin>.wasm` into `store` with `manifest`, by the real CLI.
    fn install(&self, plugin: &str, manifest: &str, store: &Path) -> anyhow::Result<()> {
        let file = self.cluster.dir.path().join(format!("{plugin}-{}.toml", free_port()));
        std::fs::write(&file, manifest)?;
        let out = std::process::Command::new(crate::cmover_bin())
            .args(["plugin", "install"])
            .arg(cm_plugin_host::bundled::dist_dir().join(format!("{plugin}.wasm")))
            .arg("--manifest")
            .arg(&file)
            .arg("--store")
            .arg(store)
            .output()
            .context("cmover plugin install")?;
        anyhow::ensure!(
            out.status.success(),
            "installing {plugin}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Where clients connect: Varnish when there is one, else HAProxy.
    pub fn front(&self) -> &str {
        self.varnish.as_ref().map_or(&self.haproxy.front, |v| &v.address)
    }

    /// Sets site `www`'s go-live: `policy` (e.g. `{"policy": "rolling", …}`) through the
    /// HAProxy plugin `lb`, pool `app`, every server's nginx, `/release.txt` as the health
    /// check; caches told every changed path (up to 10,000 rather than a whole-site purge).
    pub async fn set_golive(&self, policy: Value, drain_grace_ms: u64) -> anyhow::Result<()> {
        self.cluster
            .put_site(json!({
                "golive": {
                    "policy": policy,
                    "load_balancer": "lb",
                    "pool": "app",
                    "servers": self.servers,
                    "health": {"paths": ["/release.txt"]},
                    "drain_grace_ms": drain_grace_ms,
                    "rotation_interval_ms": 500,
                },
                "refresh": {"cache_max_paths": 10_000},
            }))
            .await?;
        Ok(())
    }
}
