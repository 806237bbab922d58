//! Integration tests of diskfs against images made by the real tools
//! (mkfs.ext4, sfdisk, mkfs.fat + mcopy, mkntfs + ntfscp; no root needed).
//! A missing tool fails the test with the apt package to install when `CI`
//! is set, and skips it otherwise (crates/diskfs/APT-PACKAGES lists them).

mod common;
mod ext4;
mod extract;
mod fat;
mod hostile;
mod ntfs;
mod partitions;
