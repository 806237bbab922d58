//! The host as it boots: one pool, one host, a local CBT-capable SR, a
//! management and an NBD network, and dom0. Creates; never changes later.

use std::collections::BTreeMap;

use super::*;

impl State {
    /// A host with one pool, a local SR (CBT-capable, plugged), a
    /// management network and an NBD network (purpose `nbd`), and dom0.
    pub fn new(config: HostConfig) -> State {
        let host = new_ref();
        let pool = new_ref();
        let sr = new_ref();
        let pbd = new_ref();
        let mgmt_net = new_ref();
        let nbd_net = new_ref();
        let dom0 = new_ref();
        let mut st = State {
            faults: Faults::default(),
            sessions: BTreeMap::new(),
            pools: BTreeMap::new(),
            hosts: BTreeMap::new(),
            srs: BTreeMap::new(),
            pbds: BTreeMap::new(),
            networks: BTreeMap::new(),
            pifs: BTreeMap::new(),
            vms: BTreeMap::new(),
            vbds: BTreeMap::new(),
            vdis: BTreeMap::new(),
            tasks: BTreeMap::new(),
            host: host.clone(),
            dom0: dom0.clone(),
            default_sr: sr.clone(),
            nbd_network: nbd_net.clone(),
            config,
        };
        st.hosts.insert(
            host.clone(),
            Host {
                uuid: new_uuid(),
                name_label: "cbtvault-sim".into(),
                hostname: st.config.hostname.clone(),
                address: st.config.nbd_address.clone(),
                certificate_pem: st.config.certificate_pem.clone(),
                nbd_port: None,
                control_domain: None,
            },
        );
        st.pools.insert(
            pool,
            Pool {
                uuid: new_uuid(),
                name_label: "cbtvault-sim pool".into(),
                master: host.clone(),
                default_sr: sr.clone(),
            },
        );
        st.srs.insert(
            sr.clone(),
            Sr {
                uuid: new_uuid(),
                name_label: "Local storage".into(),
                name_description: "simulated EXT SR".into(),
                sr_type: "ext".into(),
                cbt_capable: true,
                shared: false,
            },
        );
        st.pbds.insert(
            pbd,
            Pbd {
                uuid: new_uuid(),
                host: host.clone(),
                sr,
                currently_attached: true,
            },
        );
        st.networks.insert(
            mgmt_net.clone(),
            Network {
                uuid: new_uuid(),
                name_label: "Pool-wide network associated with eth0".into(),
                bridge: "xenbr0".into(),
                purpose: Vec::new(),
            },
        );
        st.networks.insert(
            nbd_net.clone(),
            Network {
                uuid: new_uuid(),
                name_label: "NBD network".into(),
                bridge: "xenbr1".into(),
                purpose: vec!["nbd".into()],
            },
        );
        st.pifs.insert(
            new_ref(),
            Pif {
                uuid: new_uuid(),
                device: "eth0".into(),
                network: mgmt_net,
                host: host.clone(),
                ip: st.config.nbd_address.clone(),
                ipv6: Vec::new(),
                management: true,
                currently_attached: true,
            },
        );
        st.pifs.insert(
            new_ref(),
            Pif {
                uuid: new_uuid(),
                device: "eth1".into(),
                network: nbd_net,
                host,
                ip: st.config.nbd_address.clone(),
                ipv6: Vec::new(),
                management: false,
                currently_attached: true,
            },
        );
        st.vms.insert(dom0, Vm::control_domain("cbtvault-sim"));
        st
    }
}
