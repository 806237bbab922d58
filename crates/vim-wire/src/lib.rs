//! VMware vSphere (vim25) SOAP on the wire, both ends, sans I/O: a small
//! namespace-aware XML tree (`xml`), the SOAP envelope and typed vim
//! faults (`soap`), the data objects of the CBT workflow (`types`,
//! `device`, `property`), the calls (`methods`: RetrieveServiceContent,
//! Login, Logout, RetrievePropertiesEx, ContinueRetrievePropertiesEx,
//! FindByUuid, FindByInventoryPath, ReconfigVM_Task, CreateSnapshot_Task,
//! RemoveSnapshot_Task, QueryChangedDiskAreas) and the changeId
//! (`change_id`). The product's vSphere client and the vSphere simulator
//! share it, so there is one encoder and one decoder per form.
//!
//! Element names and order follow the vim25 WSDL (govmomi `vim25/types`,
//! pyVmomi's type tables); the simulator's conformance test checks them
//! against pyVmomi. Pure: bytes and values in, bytes and values out.
//! Depends on no other crate of the workspace. Every decoder bounds depth
//! and size, returns a typed error naming what and where, never panics,
//! and is fuzzed (fuzz/fuzz_targets/vim_soap.rs).
//!
//! A client call, e.g. the changed areas of one disk:
//!
//! ```
//! use vim_wire::{DiskChangeInfo, Method, Moref, Request, Response};
//! let req = Request::QueryChangedDiskAreas {
//!     this: Moref::new("VirtualMachine", "vm-42"),
//!     snapshot: Some(Moref::new("VirtualMachineSnapshot", "snapshot-77")),
//!     device_key: 2000,
//!     start_offset: 0,
//!     change_id: "52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b/3".into(),
//! };
//! let body = req.to_envelope(); // POST /sdk, SOAPAction urn:vim25/8.0.3.0
//! # let answer = Response::DiskChangeInfo(DiskChangeInfo {
//! #     start_offset: 0, length: 1 << 20, changed_area: vec![] }).to_envelope(Method::QueryChangedDiskAreas);
//! match Response::from_envelope(Method::QueryChangedDiskAreas, answer.as_bytes()) {
//!     Ok(Ok(Response::DiskChangeInfo(info))) => assert_eq!(info.next_offset(), 1 << 20),
//!     Ok(Ok(other)) => panic!("{other:?}"),
//!     Ok(Err(fault)) => panic!("the server answered {fault}"),
//!     Err(malformed) => panic!("{malformed}"),
//! }
//! # let _ = body;
//! ```

pub mod change_id;
pub mod device;
pub mod error;
pub mod methods;
pub mod property;
pub mod soap;
pub mod types;
pub mod xml;

pub use change_id::ChangeId;
pub use device::{BackingKind, DiskBacking, VirtualDevice, VirtualDisk};
pub use error::{ChangeIdError, DecodeError, XmlError};
pub use methods::{soap_action, Method, Request, Response};
pub use property::{
    DynamicProperty, MissingProperty, ObjectContent, ObjectSpec, PropertyFilterSpec, PropertySpec,
    PropertyValue, RetrieveOptions, RetrieveResult, SelectionSpec, TraversalSpec,
};
pub use soap::{Body, Fault, LocalizedMethodFault, VimFault};
pub use types::{
    AboutInfo, ConfigSpec, DiskChangeExtent, DiskChangeInfo, Moref, ServiceContent, SnapshotInfo,
    SnapshotTree, TaskInfo, TaskResult, TaskState, UserSession,
};
pub use xml::{Element, QName};
