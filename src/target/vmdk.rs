//! The text descriptor of a flat VMDK (VMware Virtual Disk Format 1.1,
//! `createType="vmfs"`: one `RW <sectors> VMFS "<name>-flat.vmdk"` extent
//! holding the raw bytes), written by a vSphere restore and read back by
//! its `--verify`. Pure: no I/O.

use std::fmt::Write as _;

/// Bytes per sector: a VMDK's sizes count 512-byte sectors.
pub const SECTOR_BYTES: u64 = 512;
/// The largest descriptor read back (real ones are under 1 KiB).
pub const MAX_DESCRIPTOR_BYTES: usize = 64 << 10;

/// What a descriptor says about its one flat extent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatDescriptor {
    /// The extent's file, relative to the descriptor's folder.
    pub extent_file: String,
    pub sectors: u64,
    /// `CID` (8 hex digits).
    pub cid: u32,
    pub create_type: String,
    pub adapter_type: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// The sectors a disk of `bytes` needs (a partial last sector counts).
pub fn sectors_for(bytes: u64) -> u64 {
    bytes.div_ceil(SECTOR_BYTES)
}

/// A descriptor for a flat extent `extent_file` of `sectors` sectors.
/// `id` (any 16 bytes, e.g. from the snapshot id) seeds the content ids
/// and the disk uuid, so the same restore writes the same descriptor.
pub fn flat_descriptor(
    extent_file: &str,
    sectors: u64,
    id: [u8; 16],
) -> Result<String, DescriptorError> {
    if extent_file.is_empty()
        || extent_file.contains(['"', '/', '\n', '\r'])
        || extent_file.chars().any(char::is_control)
    {
        return Err(DescriptorError::Invalid(format!(
            "extent file name {extent_file:?}: must be a plain file name without quotes"
        )));
    }
    if sectors == 0 {
        return Err(DescriptorError::Invalid("a disk of 0 sectors".into()));
    }
    let cid = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
    // ESXi writes the legacy CHS geometry of 255 heads and 63 sectors per
    // track, cylinders capped at 65535.
    let cylinders = (sectors / (255 * 63)).clamp(1, 65535);
    let mut long = String::new();
    for b in &id {
        let _ = write!(long, "{b:02x}");
    }
    let uuid: Vec<String> = id.iter().map(|b| format!("{b:02x}")).collect();
    let uuid = format!("{}-{}", uuid[..8].join(" "), uuid[8..].join(" "));
    let mut t = String::new();
    let _ = writeln!(t, "# Disk DescriptorFile");
    let _ = writeln!(t, "version=1");
    let _ = writeln!(t, "encoding=\"UTF-8\"");
    let _ = writeln!(t, "CID={cid:08x}");
    let _ = writeln!(t, "parentCID=ffffffff");
    let _ = writeln!(t, "createType=\"vmfs\"");
    let _ = writeln!(t);
    let _ = writeln!(t, "# Extent description");
    let _ = writeln!(t, "RW {sectors} VMFS \"{extent_file}\"");
    let _ = writeln!(t);
    let _ = writeln!(t, "# The Disk Data Base");
    let _ = writeln!(t, "#DDB");
    let _ = writeln!(t);
    let _ = writeln!(t, "ddb.adapterType = \"lsilogic\"");
    let _ = writeln!(t, "ddb.geometry.cylinders = \"{cylinders}\"");
    let _ = writeln!(t, "ddb.geometry.heads = \"255\"");
    let _ = writeln!(t, "ddb.geometry.sectors = \"63\"");
    let _ = writeln!(t, "ddb.longContentID = \"{long}\"");
    let _ = writeln!(t, "ddb.uuid = \"{uuid}\"");
    let _ = writeln!(t, "ddb.virtualHWVersion = \"13\"");
    Ok(t)
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v)
}

/// Reads a descriptor with exactly one flat (`VMFS` or `FLAT`, offset 0)
/// read-write extent; anything else (sparse extents, several extents, a
/// parent) is an error naming the line.
pub fn parse_flat_descriptor(bytes: &[u8]) -> Result<FlatDescriptor, DescriptorError> {
    if bytes.len() > MAX_DESCRIPTOR_BYTES {
        return Err(DescriptorError::Invalid(format!(
            "{} bytes: larger than any descriptor ({MAX_DESCRIPTOR_BYTES})",
            bytes.len()
        )));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| DescriptorError::Invalid(format!("not UTF-8: {e}")))?;
    let mut extent = None;
    let mut cid = None;
    let mut create_type = None;
    let mut adapter_type = None;
    let mut parent_ok = true;
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        let bad = |reason: String| DescriptorError::Line {
            line: line_no,
            reason,
        };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line
            .strip_prefix("RW ")
            .or_else(|| line.strip_prefix("RDONLY "))
            .or_else(|| line.strip_prefix("NOACCESS "))
        {
            if !line.starts_with("RW ") {
                return Err(bad("the extent is not read-write".into()));
            }
            if extent.is_some() {
                return Err(bad("a second extent (only one flat extent is read)".into()));
            }
            let mut parts = rest.splitn(3, ' ');
            let sectors = parts
                .next()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| bad("the extent's sector count is not a number".into()))?;
            let kind = parts.next().unwrap_or("");
            if kind != "VMFS" && kind != "FLAT" {
                return Err(bad(format!(
                    "extent type '{kind}': only flat extents (VMFS, FLAT) are read"
                )));
            }
            let rest = parts.next().unwrap_or("").trim();
            let name_end = rest
                .strip_prefix('"')
                .and_then(|r| r.find('"'))
                .ok_or_else(|| bad("the extent's file name is not quoted".into()))?;
            let name = &rest[1..1 + name_end];
            let offset = rest[name_end + 2..].trim();
            if !offset.is_empty() && offset != "0" {
                return Err(bad(format!(
                    "the extent starts at sector {offset} of its file, not 0"
                )));
            }
            extent = Some((name.to_string(), sectors));
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(bad(format!(
                "'{line}' is neither an extent nor key = value"
            )));
        };
        let (key, value) = (key.trim(), unquote(value));
        match key {
            "CID" => {
                cid = Some(
                    u32::from_str_radix(value, 16)
                        .map_err(|_| bad(format!("CID '{value}' is not 8 hex digits")))?,
                )
            }
            "parentCID" => parent_ok = value.eq_ignore_ascii_case("ffffffff"),
            "createType" => create_type = Some(value.to_string()),
            "ddb.adapterType" => adapter_type = Some(value.to_string()),
            "parentFileNameHint" => parent_ok = false,
            _ => {}
        }
    }
    if !parent_ok {
        return Err(DescriptorError::Invalid(
            "the descriptor names a parent disk (a delta), not a flat disk".into(),
        ));
    }
    let (extent_file, sectors) =
        extent.ok_or_else(|| DescriptorError::Invalid("no extent line".into()))?;
    Ok(FlatDescriptor {
        extent_file,
        sectors,
        cid: cid.ok_or_else(|| DescriptorError::Invalid("no CID".into()))?,
        create_type: create_type.ok_or_else(|| DescriptorError::Invalid("no createType".into()))?,
        adapter_type,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: [u8; 16] = [
        0x52, 0x1f, 0x0a, 0x9c, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0xff,
    ];

    #[test]
    fn written_descriptors_read_back() {
        let t = flat_descriptor("web 01-flat.vmdk", 8_388_608, ID).unwrap();
        assert!(t.starts_with("# Disk DescriptorFile\nversion=1\n"));
        assert!(t.contains("CID=521f0a9c\n"));
        assert!(t.contains("\nRW 8388608 VMFS \"web 01-flat.vmdk\"\n"));
        assert!(t.contains("ddb.geometry.cylinders = \"522\""));
        assert!(t.contains("ddb.uuid = \"52 1f 0a 9c 01 02 03 04-05 06 07 08 09 0a 0b ff\""));
        let d = parse_flat_descriptor(t.as_bytes()).unwrap();
        assert_eq!(
            d,
            FlatDescriptor {
                extent_file: "web 01-flat.vmdk".into(),
                sectors: 8_388_608,
                cid: 0x521f0a9c,
                create_type: "vmfs".into(),
                adapter_type: Some("lsilogic".into()),
            }
        );
    }

    #[test]
    fn sizes_round_up_to_sectors() {
        assert_eq!(sectors_for(1), 1);
        assert_eq!(sectors_for(512), 1);
        assert_eq!(sectors_for(513), 2);
        assert_eq!(sectors_for(1 << 30), 2_097_152);
    }

    #[test]
    fn bad_names_and_descriptors_are_refused_with_the_line() {
        for name in ["", "a\"b", "dir/x-flat.vmdk", "a\nb"] {
            assert!(flat_descriptor(name, 1, ID).is_err(), "{name:?}");
        }
        assert!(flat_descriptor("x", 0, ID).is_err());
        let good = flat_descriptor("x-flat.vmdk", 2048, ID).unwrap();
        let cases = [
            (good.replace("VMFS", "SPARSE"), "line 9"),
            (good.replace("RW 2048", "RW lots"), "line 9"),
            (
                good.replace("\"x-flat.vmdk\"", "\"x-flat.vmdk\" 7"),
                "line 9",
            ),
            (good.replace("RW ", "RDONLY "), "line 9"),
            (
                format!("{good}RW 1 VMFS \"y-flat.vmdk\"\n"),
                "second extent",
            ),
            (good.replace("CID=521f0a9c", "CID=zz"), "line 4"),
            (
                good.replace("parentCID=ffffffff", "parentCID=12345678"),
                "parent",
            ),
            (
                good.replace("RW 2048 VMFS \"x-flat.vmdk\"\n", ""),
                "no extent",
            ),
            (format!("{good}garbage\n"), "neither"),
        ];
        for (text, want) in cases {
            let e = parse_flat_descriptor(text.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e} lacks {want}");
        }
        assert!(parse_flat_descriptor(&[0xff, 0xfe]).is_err());
        assert!(parse_flat_descriptor(&vec![b'#'; MAX_DESCRIPTOR_BYTES + 1]).is_err());
    }
}
