//! The simulated datastore `datastore1` on the local file system: each
//! VM's disks as a VMDK descriptor plus a sparse `-flat.vmdk` (the live
//! bytes), and the frozen copies snapshots keep (`frozen/`). Only this
//! module touches those files; paths from the network are checked here
//! (no `..`, no absolute paths) before anything is opened.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

/// The one datastore's name.
pub const DATASTORE: &str = "datastore1";
/// Bytes per copy or scan step.
const CHUNK: usize = 1 << 20;

/// A datastore-relative path (`vm/vm.vmdk`) as safe components, or `None`.
pub fn safe_relative(path: &str) -> Option<PathBuf> {
    let p = Path::new(path.trim_start_matches('/'));
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// `vm/vm.vmdk` -> `vm/vm-flat.vmdk`.
pub fn flat_name(descriptor: &str) -> String {
    match descriptor.strip_suffix(".vmdk") {
        Some(stem) => format!("{stem}-flat.vmdk"),
        None => format!("{descriptor}-flat"),
    }
}

/// `vm/vm.vmdk`, 2 -> `vm/vm-000002.vmdk` (a snapshot delta's name).
pub fn delta_name(descriptor: &str, n: usize) -> String {
    let stem = descriptor.strip_suffix(".vmdk").unwrap_or(descriptor);
    format!("{stem}-{n:06}.vmdk")
}

/// `[datastore1] vm/vm.vmdk`.
pub fn datastore_path(relative: &str) -> String {
    format!("[{DATASTORE}] {relative}")
}

/// The datastore folder and the frozen copies' folder under `dir`.
#[derive(Debug, Clone)]
pub struct Store {
    pub datastore: PathBuf,
    pub frozen: PathBuf,
}

impl Store {
    pub fn new(dir: &Path) -> io::Result<Store> {
        let s = Store {
            datastore: dir.join(DATASTORE),
            frozen: dir.join("frozen"),
        };
        std::fs::create_dir_all(&s.datastore)?;
        std::fs::create_dir_all(&s.frozen)?;
        Ok(s)
    }

    /// The file of a datastore-relative path (checked).
    pub fn file(&self, relative: &str) -> Option<PathBuf> {
        safe_relative(relative).map(|p| self.datastore.join(p))
    }

    /// A new disk: descriptor and an empty (sparse) flat file.
    pub fn create_disk(&self, descriptor: &str, capacity: u64, uuid: &str) -> io::Result<()> {
        let desc = self
            .file(descriptor)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad disk path"))?;
        if let Some(parent) = desc.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let flat = flat_name(descriptor);
        let flat_file = Path::new(&flat)
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or("disk-flat.vmdk")
            .to_string();
        std::fs::write(&desc, descriptor_text(capacity, &flat_file, uuid))?;
        let f = File::create(self.datastore.join(&flat))?;
        f.set_len(capacity)
    }

    /// The live bytes' file of a disk.
    pub fn live(&self, descriptor: &str) -> PathBuf {
        self.datastore.join(flat_name(descriptor))
    }

    /// Where a snapshot keeps the frozen bytes of one disk.
    pub fn frozen_file(&self, snapshot: &str, key: i32) -> PathBuf {
        self.frozen.join(snapshot).join(format!("{key}.img"))
    }

    pub fn remove_frozen(&self, snapshot: &str) {
        let _ = std::fs::remove_dir_all(self.frozen.join(snapshot));
    }
}

/// A monolithic-flat (VMFS) descriptor as ESXi writes it.
pub fn descriptor_text(capacity: u64, flat_file: &str, uuid: &str) -> String {
    let sectors = capacity / 512;
    let cylinders = (sectors / (255 * 63)).max(1);
    let ddb_uuid = uuid
        .replace('-', "")
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).to_string())
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=fffffffe\nparentCID=ffffffff\n\
         createType=\"vmfs\"\n\n# Extent description\nRW {sectors} VMFS \"{flat_file}\"\n\n\
         # The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\nddb.geometry.heads = \"255\"\n\
         ddb.geometry.sectors = \"63\"\nddb.thinProvisioned = \"1\"\nddb.uuid = \"{ddb_uuid}\"\n\
         ddb.virtualHWVersion = \"19\"\n"
    )
}

pub fn write_at(path: &Path, offset: u64, data: &[u8]) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    f.write_all_at(data, offset)?;
    f.sync_data()
}

/// `len` bytes at `offset`; past the end of the file reads zeros.
pub fn read_at(path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    read_into(path, offset, &mut buf)?;
    Ok(buf)
}

/// Fills `buf` from `offset`; past the end of the file reads zeros.
pub fn read_into(path: &Path, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let f = File::open(path)?;
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

/// An empty sparse file of `capacity` bytes at `dst` (a snapshot's
/// frozen copy, filled copy-on-write).
pub fn create_sparse(dst: &Path, capacity: u64) -> io::Result<()> {
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent)?;
    }
    File::create(dst)?.set_len(capacity)
}

/// Copies `[start, end)` of `src` into `dst` at the same offsets.
pub fn copy_range(src: &Path, dst: &Path, start: u64, end: u64) -> io::Result<()> {
    let from = File::open(src)?;
    let to = OpenOptions::new().write(true).open(dst)?;
    let mut buf = vec![0u8; CHUNK];
    let mut at = start;
    while at < end {
        let n = ((end - at) as usize).min(CHUNK);
        let mut done = 0;
        while done < n {
            let got = from.read_at(&mut buf[done..n], at + done as u64)?;
            if got == 0 {
                // Past the end of a sparse file: zeros.
                buf[done..n].fill(0);
                break;
            }
            done += got;
        }
        to.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    to.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_confined() {
        assert_eq!(
            safe_relative("vm/vm.vmdk"),
            Some(PathBuf::from("vm/vm.vmdk"))
        );
        assert_eq!(safe_relative("/vm/./a"), Some(PathBuf::from("vm/a")));
        assert_eq!(safe_relative("../etc/passwd"), None);
        assert_eq!(safe_relative("vm/../../x"), None);
        assert_eq!(safe_relative(""), None);
        assert_eq!(flat_name("vm/vm.vmdk"), "vm/vm-flat.vmdk");
        assert_eq!(delta_name("vm/vm_1.vmdk", 2), "vm/vm_1-000002.vmdk");
    }
}
