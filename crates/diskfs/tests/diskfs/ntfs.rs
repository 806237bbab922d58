//! ntfs tests (to come)
