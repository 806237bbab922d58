//! The method table: every call the simulator answers, with its wire name,
//! parameter counts (session included), whether it exists as
//! `Async.CLASS.method`, whether an old (pre-CBT) host lacks it, and its
//! handler. The dispatcher only looks calls up here; the list of supported
//! calls is this data. Handlers live in `calls` and `hooks`.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use super::args::Args;
use super::calls;
use super::hooks;
use crate::model::{Class, State};
use crate::Core;
use xapi_wire::ApiError;
use xapi_wire::Value;

type Reply = Result<Value, ApiError>;
/// A handler that runs under the state lock.
type StateFn = fn(&mut State, &Call) -> Reply;

/// One call as a handler sees it, after the table's checks.
pub(super) struct Call<'a> {
    /// The method as sent (for `MESSAGE_METHOD_UNKNOWN`).
    pub(super) method: &'a str,
    /// The class the call is on (`host` for the `sim.*` hooks).
    pub(super) class: Class,
    /// The method's name within its class, e.g. `snapshot`.
    pub(super) name: &'a str,
    pub(super) session: &'a str,
    pub(super) args: Args<'a>,
}

#[derive(Clone, Copy)]
pub(super) enum Handler {
    /// Runs under the state lock.
    State(StateFn),
    /// Takes the lock itself (a call that waits without holding it).
    Core(fn(&Arc<Core>, &Call) -> Reply),
}

/// How a call is checked before its handler runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// `session.login_with_password`: no session yet.
    Login,
    /// A XenAPI call: the session (a non-string one is `SESSION_INVALID`),
    /// then the injected failures (`Faults::fail_calls`).
    Api,
    /// A `sim.*` hook: the session only.
    Hook,
}

pub(super) struct Method {
    pub(super) class: Class,
    pub(super) min: usize,
    /// Also the count `MESSAGE_PARAMETER_COUNT_MISMATCH` reports.
    pub(super) max: usize,
    pub(super) kind: Kind,
    /// Exists as `Async.CLASS.method`.
    pub(super) async_ok: bool,
    /// A CBT-era call: an old host (`Faults::legacy_host`) does not know it.
    pub(super) cbt: bool,
    pub(super) handler: Handler,
}

/// The key of `get_<field>` for a field with no entry of its own.
const ANY_FIELD: &str = "get_*";
/// The prefix of the `sim.*` hooks.
const SIM: &str = "sim";

pub(super) struct Table {
    /// By wire name: `VDI.snapshot`, `sim.guest_write`, `VDI.get_*`.
    methods: BTreeMap<String, Method>,
}

impl Table {
    /// The table, built once.
    pub(super) fn get() -> &'static Table {
        static TABLE: OnceLock<Table> = OnceLock::new();
        TABLE.get_or_init(build)
    }

    /// The call `name` on `class`: its own entry, or for `get_<field>` the
    /// class's field getter.
    pub(super) fn lookup(&self, class: Class, name: &str) -> Option<&Method> {
        let key = |n: &str| format!("{}.{n}", class.wire_name());
        self.methods.get(&key(name)).or_else(|| {
            name.starts_with("get_")
                .then(|| self.methods.get(&key(ANY_FIELD)))
                .flatten()
        })
    }

    /// The hook `sim.<name>`.
    pub(super) fn hook(&self, name: &str) -> Option<&Method> {
        self.methods.get(&format!("{SIM}.{name}"))
    }

    /// Every supported call's wire name (`get_*` stands for any field).
    #[cfg(test)]
    pub(super) fn names(&self) -> impl Iterator<Item = &str> {
        self.methods.keys().map(String::as_str)
    }

    fn add(&mut self, prefix: &str, name: &str, method: Method) {
        let key = format!("{prefix}.{name}");
        let old = self.methods.insert(key, method);
        debug_assert!(old.is_none(), "{prefix}.{name} is in the table twice");
    }
}

/// What sets one entry apart; the rest is defaulted in `build`.
struct Entry {
    class: Class,
    name: &'static str,
    arity: (usize, usize),
    async_ok: bool,
    cbt: bool,
    handler: Handler,
}

fn api(class: Class, name: &'static str, arity: (usize, usize), handler: Handler) -> Entry {
    Entry {
        class,
        name,
        arity,
        async_ok: false,
        cbt: false,
        handler,
    }
}

impl Entry {
    /// Also exists as `Async.CLASS.name`.
    fn asynchronous(mut self) -> Entry {
        self.async_ok = true;
        self
    }

    /// Unknown to an old host.
    fn cbt(mut self) -> Entry {
        self.cbt = true;
        self
    }
}

fn build() -> Table {
    use Class::*;
    use Handler::State as S;
    let mut entries = vec![
        api(Session, "logout", (1, 1), S(calls::logout)),
        api(
            Host,
            "get_server_certificate",
            (2, 2),
            S(calls::host_get_server_certificate),
        ),
        // VDI
        api(Vdi, "create", (2, 2), S(calls::vdi_create)).asynchronous(),
        api(Vdi, "destroy", (2, 2), S(calls::vdi_destroy)).asynchronous(),
        api(Vdi, "snapshot", (2, 3), S(calls::vdi_snapshot)).asynchronous(),
        api(Vdi, "enable_cbt", (2, 2), S(calls::vdi_enable_cbt))
            .asynchronous()
            .cbt(),
        api(Vdi, "disable_cbt", (2, 2), S(calls::vdi_disable_cbt))
            .asynchronous()
            .cbt(),
        api(
            Vdi,
            "list_changed_blocks",
            (3, 3),
            S(calls::vdi_list_changed_blocks),
        )
        .asynchronous()
        .cbt(),
        api(
            Vdi,
            "data_destroy",
            (2, 2),
            Handler::Core(calls::vdi_data_destroy),
        )
        .asynchronous()
        .cbt(),
        api(Vdi, "get_nbd_info", (2, 2), S(calls::vdi_get_nbd_info)).cbt(),
        api(Vdi, "get_cbt_enabled", (2, 2), S(calls::get_field)).cbt(),
        api(Vdi, "set_on_boot", (3, 3), S(calls::vdi_set_on_boot)).asynchronous(),
        api(Vdi, "resize", (3, 3), S(calls::vdi_resize)).asynchronous(),
        api(Vdi, "resize_online", (3, 3), S(calls::vdi_resize)).asynchronous(),
        api(Vdi, "clone", (2, 3), S(calls::vdi_clone)).asynchronous(),
        // Every parameter after `vdi` has a default (datamodel.ml).
        api(Vdi, "copy", (2, 5), S(calls::vdi_copy)).asynchronous(),
        api(Vdi, "pool_migrate", (4, 4), S(calls::vdi_pool_migrate)).asynchronous(),
        // VM
        api(Vm, "snapshot", (3, 4), S(calls::vm_snapshot)).asynchronous(),
        api(Vm, "checkpoint", (3, 3), S(calls::vm_snapshot)).asynchronous(),
        api(Vm, "destroy", (2, 2), S(calls::vm_destroy)).asynchronous(),
        api(Vm, "start", (4, 4), S(calls::vm_start)).asynchronous(),
        api(Vm, "clean_shutdown", (2, 2), S(calls::vm_shutdown)).asynchronous(),
        api(Vm, "hard_shutdown", (2, 2), S(calls::vm_shutdown)).asynchronous(),
        api(Vm, "set_tags", (3, 3), S(calls::vm_tags)),
        api(Vm, "add_tags", (3, 3), S(calls::vm_tags)),
        api(Vm, "remove_tags", (3, 3), S(calls::vm_tags)),
        // VBD
        api(Vbd, "create", (2, 2), S(calls::vbd_create)).asynchronous(),
        api(Vbd, "destroy", (2, 2), S(calls::vbd_destroy)).asynchronous(),
        api(Vbd, "plug", (2, 2), S(calls::vbd_plug)).asynchronous(),
        api(Vbd, "unplug", (2, 2), S(calls::vbd_plug)).asynchronous(),
        // network
        api(Network, "add_purpose", (3, 3), S(calls::network_purpose)).asynchronous(),
        api(Network, "remove_purpose", (3, 3), S(calls::network_purpose)).asynchronous(),
        // task
        api(Task, "create", (3, 3), S(calls::task_create)),
        api(Task, "destroy", (2, 2), S(calls::task_destroy)),
        api(Task, "cancel", (2, 2), S(calls::task_cancel)),
    ];
    for class in [Vdi, Vm, Sr, Task, Network] {
        entries.push(api(class, "set_name_label", (3, 3), S(calls::set_name)));
        entries.push(api(
            class,
            "set_name_description",
            (3, 3),
            S(calls::set_name),
        ));
    }
    for class in [Vdi, Vm, Vbd, Task] {
        entries.push(api(
            class,
            "set_other_config",
            (3, 3),
            S(calls::other_config),
        ));
        entries.push(api(
            class,
            "add_to_other_config",
            (4, 4),
            S(calls::other_config),
        ));
        entries.push(api(
            class,
            "remove_from_other_config",
            (3, 3),
            S(calls::other_config),
        ));
    }
    for class in Class::ALL {
        entries.push(api(class, "get_all", (1, 1), S(calls::get_all)));
        entries.push(api(
            class,
            "get_all_records",
            (1, 1),
            S(calls::get_all_records),
        ));
        entries.push(api(class, "get_record", (2, 2), S(calls::get_record)));
        entries.push(api(class, "get_by_uuid", (2, 2), S(calls::get_by_uuid)));
        entries.push(api(
            class,
            "get_by_name_label",
            (2, 2),
            S(calls::get_by_name_label),
        ));
        entries.push(api(class, ANY_FIELD, (2, 2), S(calls::get_field)));
    }

    let mut table = Table {
        methods: BTreeMap::new(),
    };
    table.add(
        Session.wire_name(),
        "login_with_password",
        Method {
            class: Session,
            min: 2,
            max: 4,
            kind: Kind::Login,
            async_ok: false,
            cbt: false,
            handler: S(calls::login),
        },
    );
    for e in entries {
        table.add(
            e.class.wire_name(),
            e.name,
            Method {
                class: e.class,
                min: e.arity.0,
                max: e.arity.1,
                kind: Kind::Api,
                async_ok: e.async_ok,
                cbt: e.cbt,
                handler: e.handler,
            },
        );
    }
    let hooks: [(&str, usize, Handler); 12] = [
        ("guest_write", 4, S(hooks::guest_write)),
        ("system_disable_cbt", 2, S(hooks::system_disable_cbt)),
        ("set_fault", 3, S(hooks::set_fault)),
        ("attach_to_dom0", 2, S(hooks::attach_to_dom0)),
        ("detach", 2, S(hooks::detach)),
        ("create_vm", 3, S(hooks::create_vm)),
        ("add_disk", 5, S(hooks::add_disk_hook)),
        ("create_sr", 3, S(hooks::create_sr)),
        ("add_cd", 3, S(hooks::add_cd_hook)),
        ("suspend_vm", 2, S(hooks::suspend_vm)),
        ("set_sr_physical_size", 3, S(hooks::set_sr_physical_size)),
        ("restart_xapi", 2, Handler::Core(hooks::restart_xapi)),
    ];
    for (name, arity, handler) in hooks {
        table.add(
            SIM,
            name,
            Method {
                class: Host,
                min: arity,
                max: arity,
                kind: Kind::Hook,
                async_ok: false,
                cbt: false,
                handler,
            },
        );
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_each_call_once_with_a_sane_arity() {
        let t = build();
        let names: Vec<&str> = t.names().collect();
        assert!(names.contains(&"VDI.list_changed_blocks"));
        assert!(names.contains(&"sim.guest_write"));
        for m in t.methods.values() {
            assert!(m.min <= m.max);
            assert!(m.kind != Kind::Hook || !m.async_ok);
        }
    }

    #[test]
    fn field_getters_fall_back_to_the_class_getter_but_setters_do_not() {
        let t = Table::get();
        assert!(t.lookup(Class::Vdi, "get_virtual_size").is_some());
        assert!(t.lookup(Class::Vdi, "set_virtual_size").is_none());
        assert!(t.lookup(Class::Pool, "set_name_label").is_none());
        assert!(t.hook("guest_write").is_some());
        assert!(t.hook("nope").is_none());
    }
}
