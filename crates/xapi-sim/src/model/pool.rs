//! A pool of several hosts: members joined while the simulator runs, each
//! with its own control domain, PIFs and local SR, and shared SRs with a
//! PBD on every host. Which host sees which SR decides where the HTTP
//! handlers redirect (reference §3.1) and which hosts `VDI.get_nbd_info`
//! lists (§2.6). The first host is the master.

use std::collections::BTreeMap;

use super::*;

impl Vm {
    /// The control domain (dom0) of the host named `host_name`.
    pub fn control_domain(host_name: &str) -> Vm {
        Vm {
            uuid: new_uuid(),
            name_label: format!("Control domain on host: {host_name}"),
            name_description: "The domain which manages physical devices and manages other domains"
                .into(),
            power_state: "Running".into(),
            is_control_domain: true,
            is_a_snapshot: false,
            snapshot_of: NULL_REF.into(),
            snapshot_time: None,
            other_config: BTreeMap::new(),
            tags: Vec::new(),
        }
    }
}

/// A host joining the pool.
#[derive(Debug, Clone)]
pub struct NewMember {
    pub name: String,
    /// Its management and NBD address (the HTTPS port is the master's).
    pub address: String,
    pub certificate_pem: String,
    pub nbd_port: u16,
}

impl State {
    /// The pool master (the first host).
    pub fn master(&self) -> Ref {
        self.pools
            .values()
            .next()
            .map(|p| p.master.clone())
            .unwrap_or_else(|| self.host.clone())
    }

    /// `host`'s control domain.
    pub fn dom0_of(&self, host: &str) -> Ref {
        self.hosts
            .get(host)
            .and_then(|h| h.control_domain.clone())
            .unwrap_or_else(|| self.dom0.clone())
    }

    /// Every control domain of the pool.
    pub fn control_domains(&self) -> Vec<Ref> {
        self.hosts.keys().map(|h| self.dom0_of(h)).collect()
    }

    /// The port `host`'s xapi-nbd listens on.
    pub fn nbd_port_of(&self, host: &str) -> u16 {
        self.hosts
            .get(host)
            .and_then(|h| h.nbd_port)
            .unwrap_or(self.config.nbd_port)
    }

    /// `host` has the SR plugged (a currently attached PBD).
    pub fn host_sees_sr(&self, host: &str, sr: &str) -> bool {
        self.pbds
            .values()
            .any(|p| p.host == host && p.sr == sr && p.currently_attached)
    }

    /// The hosts that have the SR plugged, master first.
    pub fn hosts_seeing_sr(&self, sr: &str) -> Vec<Ref> {
        let master = self.master();
        let mut hosts: Vec<Ref> = self
            .hosts
            .keys()
            .filter(|h| self.host_sees_sr(h, sr))
            .cloned()
            .collect();
        hosts.sort_by_key(|h| *h != master);
        hosts
    }

    /// The SR of a VDI given by reference or uuid.
    pub fn sr_of_vdi(&self, vdi: &str) -> Option<Ref> {
        let r = self.vdi_by_ref_or_uuid(vdi).ok()?;
        self.vdis.get(&r).map(|v| v.sr.clone())
    }

    fn plug(&mut self, host: &str, sr: &str) {
        self.pbds.insert(
            new_ref(),
            Pbd {
                uuid: new_uuid(),
                host: host.to_string(),
                sr: sr.to_string(),
                currently_attached: true,
            },
        );
    }

    /// Joins a host to the pool: its control domain, a management and an
    /// NBD PIF on the pool's networks, a local SR only it sees, and a PBD
    /// for every shared SR. Returns the host and its local SR.
    pub fn add_pool_member(&mut self, m: NewMember) -> (Ref, Ref) {
        let host = new_ref();
        let dom0 = new_ref();
        self.vms.insert(dom0.clone(), Vm::control_domain(&m.name));
        self.hosts.insert(
            host.clone(),
            Host {
                uuid: new_uuid(),
                name_label: m.name.clone(),
                hostname: m.name.clone(),
                address: m.address.clone(),
                certificate_pem: m.certificate_pem,
                nbd_port: Some(m.nbd_port),
                control_domain: Some(dom0),
            },
        );
        let management: Option<Ref> = self
            .pifs
            .values()
            .find(|p| p.management)
            .map(|p| p.network.clone());
        let networks = management.into_iter().map(|n| (n, "eth0", true)).chain([(
            self.nbd_network.clone(),
            "eth1",
            false,
        )]);
        for (network, device, management) in networks.collect::<Vec<_>>() {
            self.pifs.insert(
                new_ref(),
                Pif {
                    uuid: new_uuid(),
                    device: device.into(),
                    network,
                    host: host.clone(),
                    ip: m.address.clone(),
                    ipv6: Vec::new(),
                    management,
                    currently_attached: true,
                },
            );
        }
        let local = new_ref();
        self.srs.insert(
            local.clone(),
            Sr {
                uuid: new_uuid(),
                name_label: format!("Local storage on {}", m.name),
                name_description: "simulated EXT SR".into(),
                sr_type: "ext".into(),
                cbt_capable: true,
                shared: false,
            },
        );
        self.plug(&host, &local);
        let shared: Vec<Ref> = self
            .srs
            .iter()
            .filter(|(_, s)| s.shared)
            .map(|(r, _)| r.clone())
            .collect();
        for sr in shared {
            self.plug(&host, &sr);
        }
        (host, local)
    }

    /// A CBT-capable shared SR (type `nfs`) plugged on every host.
    pub fn add_shared_sr(&mut self, name: &str) -> Result<Ref, ApiError> {
        self.sr_create(name, "nfs")
    }
}
