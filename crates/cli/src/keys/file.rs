//! A gateway keys file, edited in place: `[[keys]]` tables added, changed or removed, with every
//! other entry, comment and blank line kept as the operator wrote them.
//!
//! Promises:
//! - **A reader never sees a half-written file.** The new text goes to a temporary file in the
//!   same directory, is flushed to disk, and is renamed over the old file (a rename within one
//!   file system is atomic); the directory is then synced so that the rename survives a crash. A
//!   gateway, `cat` or a file watcher sees the old file or the new one, nothing in between.
//! - **A refused edit changes nothing**: a duplicate id, an unknown id, an entry the gateway would
//!   refuse. Before anything is written, the whole new text is read back as the gateway reads it
//!   and checked with the gateway's own rules ([`llmesh_keys::check_all`]), so `llmesh keys` cannot
//!   write a file the gateway rejects, with one exception: a file without keys (after revoking the
//!   last one), which the gateway refuses on purpose (auth fails closed).
//! - **Only entries are written**, never a key: the secret of `llmesh keys new` stays on stdout.
//! - The new file keeps the old one's permission bits (and owner, where this user may set it). A
//!   new file is made readable by its owner only (0600). A symbolic link is followed: the file it
//!   points to is replaced and the link stays.
//!
//! Not promised: two edits of one file at the same moment. Each reads, changes and renames; the
//! later rename wins and the other change is lost. These are commands an operator runs one at a
//! time.
//!
//! Comments belong to the entry they sit directly above: revoking an entry removes the comment
//! lines that touch its `[[keys]]` line, and keeps everything above the blank line before them
//! (the file's own header, notes about other entries).

use std::{
    fs::{self, Metadata},
    io::Write as _,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use llmesh_keys::{ApiKey, Budget, check_all, parse_keys_file};
use toml_edit::{Array, ArrayOfTables, DocumentMut, Item, Table, value};

/// Mode of a keys file this command creates: its owner's only.
const NEW_FILE_MODE: u32 = 0o600;

/// The header of a keys file `llmesh keys new --file` creates.
const NEW_FILE_HEADER: &str = "\
# API keys the llmesh gateway accepts (`[gateway.auth] keys_file`, LLMESH_GATEWAY_AUTH__KEYS_FILE).
# Written by `llmesh keys`: one [[keys]] table per key, holding its public `prefix` and the SHA-256
# of the whole key, never the key itself. `llmesh keys list --file` shows them.
";

/// Which entry a command is about: its id, and its prefix when several entries share the id.
#[derive(Debug, Clone, Copy)]
pub struct Selector<'a> {
    pub id: &'a str,
    pub prefix: Option<&'a str>,
}

/// What `llmesh keys set` changes in an entry: `Some` sets a field, a field in `clear` is removed
/// (back to the gateway's default: no team, every model, the `[gateway.rate_limit]` limits).
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub team: Option<String>,
    pub models: Option<Vec<String>>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub budget: Option<Budget>,
    pub clear: Vec<Field>,
}

/// The optional fields of an entry, as `--clear` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Field {
    Team,
    Models,
    RequestsPerMinute,
    TokensPerMinute,
    Budget,
}

impl Field {
    /// Its key in the file.
    pub fn key(self) -> &'static str {
        match self {
            Self::Team => "team",
            Self::Models => "models",
            Self::RequestsPerMinute => "requests_per_minute",
            Self::TokensPerMinute => "tokens_per_minute",
            Self::Budget => "budget",
        }
    }
}

/// A keys file read for editing. Nothing reaches the disk before [`KeysFile::save`].
#[derive(Debug)]
pub struct KeysFile {
    /// As the operator named it, for messages.
    shown: PathBuf,
    /// The file that is replaced: `shown` with symbolic links resolved.
    target: PathBuf,
    /// The file's metadata, `None` for a file this command creates.
    existing: Option<Metadata>,
    /// Everything but the entries: comments before the first and after the last.
    doc: DocumentMut,
    /// The `[[keys]]` tables, each with the comments above it.
    tables: ArrayOfTables,
    /// The same entries as the gateway reads them.
    entries: Vec<ApiKey>,
}

impl KeysFile {
    /// Reads `path`. A missing file is an error unless `create`, when it starts empty.
    pub fn open(path: &Path, create: bool) -> anyhow::Result<Self> {
        let shown = path.to_owned();
        let (text, target, existing) = match fs::read_to_string(path) {
            Ok(text) => {
                let target =
                    fs::canonicalize(path).with_context(|| format!("cannot resolve keys file {}", path.display()))?;
                let metadata =
                    fs::metadata(&target).with_context(|| format!("cannot read keys file {}", path.display()))?;
                (text, target, Some(metadata))
            }
            Err(error) if create && error.kind() == std::io::ErrorKind::NotFound => {
                (String::new(), path.to_owned(), None)
            }
            Err(error) => return Err(error).with_context(|| format!("cannot read keys file {}", path.display())),
        };
        let entries = parse_keys_file(&text).with_context(|| format!("invalid keys file {}", path.display()))?;
        let mut doc: DocumentMut = text.parse().with_context(|| format!("invalid keys file {}", path.display()))?;
        let tables = match doc.remove("keys") {
            None => ArrayOfTables::new(),
            Some(Item::ArrayOfTables(tables)) => tables,
            // `keys = []`: no entries yet; `[[keys]]` tables replace it.
            Some(Item::Value(toml_edit::Value::Array(array))) if array.is_empty() => ArrayOfTables::new(),
            Some(_) => bail!(
                "keys file {} lists its keys in an inline array (`keys = [...]`); `llmesh keys` edits only \
                 `[[keys]]` tables: write each entry as a `[[keys]]` table",
                path.display()
            ),
        };
        if text.is_empty() && existing.is_none() {
            doc.set_trailing(NEW_FILE_HEADER);
        }
        Ok(Self { shown, target, existing, doc, tables, entries })
    }

    /// The path as the operator gave it.
    pub fn path(&self) -> &Path {
        &self.shown
    }

    /// The entries, as the gateway reads them.
    pub fn entries(&self) -> &[ApiKey] {
        &self.entries
    }

    /// Appends `entry` as a new `[[keys]]` table; refuses an id the file already has.
    pub fn add(&mut self, entry: ApiKey) -> anyhow::Result<()> {
        if let Some(same) = self.entries.iter().find(|existing| existing.id == entry.id) {
            bail!(
                "keys file {} already has a key with id {:?} (prefix {}); pick another id, or revoke that key first",
                self.shown.display(),
                entry.id,
                same.prefix
            );
        }
        let mut table = entry_table(&entry);
        let comments = self.doc.trailing().as_str().unwrap_or_default().trim_end_matches('\n').to_owned();
        if !self.tables.is_empty() {
            table.decor_mut().set_prefix("\n");
        } else if !comments.is_empty() {
            // A file of comments only: they stay above the first entry, a blank line between.
            table.decor_mut().set_prefix(format!("{comments}\n\n"));
            self.doc.set_trailing("");
        }
        self.tables.push(table);
        self.entries.push(entry);
        Ok(())
    }

    /// Removes the one entry `selector` names, with the comment lines directly above it.
    pub fn remove(&mut self, selector: Selector<'_>) -> anyhow::Result<ApiKey> {
        let index = self.find(selector)?;
        let kept = self
            .tables
            .get(index)
            .and_then(|table| table.decor().prefix())
            .and_then(|prefix| prefix.as_str())
            .map(detached_comments)
            .unwrap_or_default();
        self.tables.remove(index);
        if !kept.is_empty() {
            // What stood above the entry but was not about it moves to whatever now follows.
            match self.tables.get_mut(index) {
                Some(next) => {
                    let rest = next.decor().prefix().and_then(|prefix| prefix.as_str()).unwrap_or_default();
                    let joined = join_comments(&kept, rest);
                    next.decor_mut().set_prefix(joined);
                }
                None => {
                    let joined = join_comments(&kept, self.doc.trailing().as_str().unwrap_or_default());
                    self.doc.set_trailing(joined);
                }
            }
        }
        Ok(self.entries.remove(index))
    }

    /// Applies `changes` to the one entry `selector` names; returns the entry as it now is.
    pub fn change(&mut self, selector: Selector<'_>, changes: &Changes) -> anyhow::Result<ApiKey> {
        let index = self.find(selector)?;
        let Some(table) = self.tables.get_mut(index) else {
            bail!("entry #{} of keys file {} vanished while editing", index + 1, self.shown.display());
        };
        for field in &changes.clear {
            table.remove(field.key());
        }
        if let Some(team) = &changes.team {
            set_value(table, Field::Team, team.as_str().into());
        }
        match &changes.models {
            // No model named is every model, which an absent `models` says more plainly.
            Some(models) if models.is_empty() => _ = table.remove(Field::Models.key()),
            Some(models) => {
                set_value(table, Field::Models, models.iter().map(String::as_str).collect::<Array>().into())
            }
            None => {}
        }
        if let Some(requests) = changes.requests_per_minute {
            set_value(table, Field::RequestsPerMinute, i64::from(requests).into());
        }
        if let Some(tokens) = changes.tokens_per_minute {
            set_value(table, Field::TokensPerMinute, i64::from(tokens).into());
        }
        if let Some(budget) = &changes.budget {
            set_value(table, Field::Budget, budget_value(budget).into());
        }
        let entry = self.entries.get_mut(index).context("entry vanished while editing")?;
        for field in &changes.clear {
            match field {
                Field::Team => entry.team = None,
                Field::Models => entry.models.clear(),
                Field::RequestsPerMinute => entry.requests_per_minute = None,
                Field::TokensPerMinute => entry.tokens_per_minute = None,
                Field::Budget => entry.budget = None,
            }
        }
        if let Some(team) = &changes.team {
            entry.team = Some(team.clone());
        }
        if let Some(models) = &changes.models {
            entry.models.clone_from(models);
        }
        if changes.requests_per_minute.is_some() {
            entry.requests_per_minute = changes.requests_per_minute;
        }
        if changes.tokens_per_minute.is_some() {
            entry.tokens_per_minute = changes.tokens_per_minute;
        }
        if changes.budget.is_some() {
            entry.budget = changes.budget;
        }
        Ok(entry.clone())
    }

    /// The new file's text.
    pub fn text(&self) -> String {
        let mut doc = self.doc.clone();
        if !self.tables.is_empty() {
            doc.insert("keys", Item::ArrayOfTables(self.tables.clone()));
        }
        doc.to_string()
    }

    /// Checks the new text as the gateway would read it, then replaces the file atomically.
    pub fn save(&self) -> anyhow::Result<()> {
        let text = self.text();
        let entries = parse_keys_file(&text).with_context(|| {
            format!("the edited keys file {} would not parse (a bug in llmesh)", self.shown.display())
        })?;
        if entries != self.entries {
            bail!("the edited keys file {} does not read back as written (a bug in llmesh)", self.shown.display());
        }
        check_all(&entries, &[])
            .with_context(|| format!("keys file {} not changed: the gateway would refuse it", self.shown.display()))?;
        write_atomically(&self.target, &text, self.existing.as_ref())
            .with_context(|| format!("cannot write keys file {}", self.shown.display()))
    }

    /// The index of the one entry `selector` names.
    fn find(&self, selector: Selector<'_>) -> anyhow::Result<usize> {
        let matches: Vec<usize> = (0..self.entries.len())
            .filter(|&i| {
                let entry = &self.entries[i];
                entry.id == selector.id && selector.prefix.is_none_or(|prefix| entry.prefix == prefix)
            })
            .collect();
        match matches[..] {
            [index] => Ok(index),
            [] => {
                let mut ids: Vec<&str> = self.entries.iter().map(|entry| entry.id.as_str()).collect();
                ids.dedup();
                let with_prefix = selector.prefix.map(|prefix| format!(" and prefix {prefix}")).unwrap_or_default();
                if ids.is_empty() {
                    bail!("keys file {} holds no keys", self.shown.display());
                }
                bail!(
                    "keys file {} has no key with id {:?}{with_prefix} (it has: {})",
                    self.shown.display(),
                    selector.id,
                    ids.join(", ")
                )
            }
            _ => {
                let prefixes: Vec<&str> = matches.iter().map(|&i| self.entries[i].prefix.as_str()).collect();
                bail!(
                    "keys file {} has {} keys with id {:?} (prefixes {}): add --prefix to pick one",
                    self.shown.display(),
                    matches.len(),
                    selector.id,
                    prefixes.join(", ")
                )
            }
        }
    }
}

/// Sets `field` to `new`, keeping the spaces and comment around the old value.
fn set_value(table: &mut Table, field: Field, mut new: toml_edit::Value) {
    match table.get_mut(field.key()).and_then(Item::as_value_mut) {
        Some(old) => {
            *new.decor_mut() = old.decor().clone();
            *old = new;
        }
        None => table[field.key()] = Item::Value(new),
    }
}

/// An entry as a `[[keys]]` table, its fields in the order the docs show them.
pub fn entry_table(entry: &ApiKey) -> Table {
    let mut table = Table::new();
    table["id"] = value(entry.id.as_str());
    if let Some(team) = &entry.team {
        table["team"] = value(team.as_str());
    }
    table["prefix"] = value(entry.prefix.as_str());
    table["sha256"] = value(entry.sha256.as_str());
    if !entry.models.is_empty() {
        table["models"] = value(entry.models.iter().map(String::as_str).collect::<Array>());
    }
    if let Some(requests) = entry.requests_per_minute {
        table["requests_per_minute"] = value(i64::from(requests));
    }
    if let Some(tokens) = entry.tokens_per_minute {
        table["tokens_per_minute"] = value(i64::from(tokens));
    }
    if let Some(budget) = &entry.budget {
        table["budget"] = value(budget_value(budget));
    }
    table
}

/// A budget as the inline table `{ usd = 50.0, period = "month" }`.
fn budget_value(budget: &Budget) -> toml_edit::InlineTable {
    let mut table = toml_edit::InlineTable::new();
    table.insert("usd", budget.usd.into());
    table.insert("period", budget.period.as_str().into());
    table
}

/// One entry as the text of a keys file (`[[keys]]` and its fields).
pub fn entry_text(entry: &ApiKey) -> String {
    let mut tables = ArrayOfTables::new();
    tables.push(entry_table(entry));
    let mut doc = DocumentMut::new();
    doc.insert("keys", Item::ArrayOfTables(tables));
    doc.to_string()
}

/// Of the text above a `[[keys]]` line, what is not about that entry: everything up to and
/// including the last blank line. The comment lines after it touch the entry and go with it.
fn detached_comments(prefix: &str) -> String {
    let lines: Vec<&str> = prefix.split_inclusive('\n').collect();
    match lines.iter().rposition(|line| line.trim().is_empty()) {
        Some(last_blank) => lines[..=last_blank].concat(),
        None => String::new(),
    }
}

/// `kept` (ending in a blank line) then `rest`, with one blank line between where both have one.
fn join_comments(kept: &str, rest: &str) -> String {
    let is_blank = |line: &str| line.trim().is_empty();
    let mut lines: Vec<&str> = kept.split_inclusive('\n').collect();
    if rest.split_inclusive('\n').next().is_some_and(is_blank) && lines.last().is_some_and(|line| is_blank(line)) {
        lines.pop();
    }
    lines.concat() + rest
}

/// Replaces `target` with `text`: a temporary file in the same directory, synced, then renamed
/// over it, then the directory synced.
fn write_atomically(target: &Path, text: &str, existing: Option<&Metadata>) -> anyhow::Result<()> {
    let dir = match target.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = target.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    let mut temp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    temp.write_all(text.as_bytes()).context("cannot write the temporary file")?;
    let mode = existing.map_or(NEW_FILE_MODE, |metadata| metadata.permissions().mode());
    temp.as_file().set_permissions(fs::Permissions::from_mode(mode)).context("cannot set the file's permissions")?;
    if let Some(metadata) = existing {
        // Kept when this user may (root, or the owner keeping its own group); otherwise the new
        // file belongs to whoever ran the command, which the warning says.
        if let Err(error) = std::os::unix::fs::fchown(temp.as_file(), Some(metadata.uid()), Some(metadata.gid())) {
            tracing::warn!(%error, "cannot keep the keys file's owner and group; it now belongs to this user");
        }
    }
    temp.as_file().sync_all().context("cannot flush the temporary file to disk")?;
    temp.persist(target).map_err(|error| error.error).context("cannot rename the temporary file over it")?;
    fs::File::open(dir)
        .and_then(|dir| dir.sync_all())
        .with_context(|| format!("renamed, but cannot sync the directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use llmesh_keys::generate_key;

    use super::*;

    /// The shipped demo file's shape: a header, a commented entry, another.
    const TWO_KEYS: &str = "\
# Header about the whole file.
# Second header line.

# x-api-key: demo's secret
[[keys]]
id = \"demo\"
prefix = \"lk_f4339b49\"
sha256 = \"6c8df90b4b8e9c4ffe3cebe882c00900798201eeadb67dddbc2f541065021195\"

# note about loadtest
[[keys]]
id = \"loadtest\"
prefix = \"lk_1b501fc9\"
sha256 = \"cefe150dabb1c32248061dfc56a0265693d67335fdf2f1f2fc377683ddfa776d\"
requests_per_minute = 1000000 # inline comment
tokens_per_minute = 100000000

# trailing note
";

    fn file_with(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("keys.toml");
        fs::write(&path, text).unwrap();
        path
    }

    fn ids(path: &Path) -> Vec<String> {
        parse_keys_file(&fs::read_to_string(path).unwrap()).unwrap().into_iter().map(|key| key.id).collect()
    }

    fn by_id(id: &str) -> Selector<'_> {
        Selector { id, prefix: None }
    }

    #[test]
    fn adding_to_a_new_file_makes_a_header_and_one_entry_readable_by_its_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let (key, mut entry) = generate_key("team-a");
        entry.team = Some("search".into());
        entry.models = vec!["sim".into(), "gpt-4o-mini".into()];
        entry.requests_per_minute = Some(60);
        entry.tokens_per_minute = Some(0);
        let mut file = KeysFile::open(&path, true).unwrap();
        file.add(entry.clone()).unwrap();
        file.save().unwrap();

        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# API keys the llmesh gateway accepts"), "{text}");
        assert!(!text.contains(&key) && !text.contains(&key[entry.prefix.len()..]), "{text}");
        assert_eq!(parse_keys_file(&text).unwrap(), [entry]);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // Nothing else is left in the directory (the temporary file was renamed).
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_missing_file_is_an_error_unless_created() {
        let dir = tempfile::tempdir().unwrap();
        let error = KeysFile::open(&dir.path().join("nope.toml"), false).unwrap_err();
        assert!(format!("{error:#}").contains("cannot read keys file"), "{error:#}");
    }

    #[test]
    fn adding_keeps_every_other_line_and_the_file_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(&dir, TWO_KEYS);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let mut file = KeysFile::open(&path, false).unwrap();
        file.add(generate_key("third").1).unwrap();
        file.save().unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let before = TWO_KEYS.trim_end_matches("# trailing note\n");
        assert!(text.starts_with(before), "{text}");
        assert!(text.contains("\n\n[[keys]]\nid = \"third\"\n"), "{text}");
        assert!(text.ends_with("# trailing note\n"), "{text}");
        assert_eq!(ids(&path), ["demo", "loadtest", "third"]);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);
    }

    #[test]
    fn a_duplicate_id_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(&dir, TWO_KEYS);
        let mut file = KeysFile::open(&path, false).unwrap();
        let error = file.add(generate_key("demo").1).unwrap_err();
        assert!(format!("{error}").contains("already has a key with id \"demo\""), "{error}");
        assert_eq!(file.text(), TWO_KEYS);
    }

    #[test]
    fn an_entry_the_gateway_would_refuse_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(&dir, TWO_KEYS);
        for id in ["", "anonymous"] {
            let mut file = KeysFile::open(&path, false).unwrap();
            file.add(generate_key(id).1).unwrap();
            let error = file.save().unwrap_err();
            assert!(format!("{error:#}").contains("the gateway would refuse it"), "{error:#}");
            assert_eq!(fs::read_to_string(&path).unwrap(), TWO_KEYS);
        }
    }

    #[test]
    fn removing_takes_exactly_one_entry_and_its_own_comment() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(&dir, TWO_KEYS);
        let mut file = KeysFile::open(&path, false).unwrap();
        assert_eq!(file.remove(by_id("demo")).unwrap().id, "demo");
        file.save().unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(ids(&path), ["loadtest"]);
        assert_eq!(
            text,
            TWO_KEYS.replace(
                "# x-api-key: demo's secret\n[[keys]]\nid = \"demo\"\nprefix = \"lk_f4339b49\"\n\
                 sha256 = \"6c8df90b4b8e9c4ffe3cebe882c00900798201eeadb67dddbc2f541065021195\"\n\n",
                ""
            )
        );

        // The last one: the header and the trailing note stay, and no `keys` is left.
        let mut file = KeysFile::open(&path, false).unwrap();
        file.remove(by_id("loadtest")).unwrap();
        file.save().unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text, "# Header about the whole file.\n# Second header line.\n\n# trailing note\n");
        assert!(parse_keys_file(&text).unwrap().is_empty());
    }

    #[test]
    fn removing_the_last_entry_moves_nothing_of_it_into_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(&dir, TWO_KEYS);
        let mut file = KeysFile::open(&path, false).unwrap();
        file.remove(by_id("loadtest")).unwrap();
        file.save().unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains("note about loadtest") && !text.contains("lk_1b501fc9"), "{text}");
        assert!(text.starts_with("# Header about the whole file.\n") && text.ends_with("# trailing note\n"), "{text}");
        assert_eq!(ids(&path), ["demo"]);
    }

    #[test]
    fn unknown_and_ambiguous_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut twin) = generate_key("demo");
        twin.prefix = "lk_00000000".into();
        let path = file_with(&dir, &format!("{TWO_KEYS}\n{}", entry_text(&twin)));
        let mut file = KeysFile::open(&path, false).unwrap();
        let error = file.remove(by_id("nobody")).unwrap_err();
        assert!(format!("{error}").contains("no key with id \"nobody\" (it has: demo, loadtest, demo)"), "{error}");
        let error = file.remove(by_id("demo")).unwrap_err();
        assert!(format!("{error}").contains("2 keys with id \"demo\" (prefixes lk_f4339b49, lk_00000000)"), "{error}");
        let removed = file.remove(Selector { id: "demo", prefix: Some("lk_00000000") }).unwrap();
        assert_eq!(removed.prefix, "lk_00000000");
        file.save().unwrap();
        assert_eq!(ids(&path), ["demo", "loadtest"]);
    }

    #[test]
    fn changes_set_and_clear_fields_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(&dir, TWO_KEYS);
        let mut file = KeysFile::open(&path, false).unwrap();
        let changes = Changes {
            team: Some("bench".into()),
            models: Some(vec!["sim".into()]),
            requests_per_minute: Some(5),
            clear: vec![Field::TokensPerMinute],
            ..Changes::default()
        };
        let changed = file.change(by_id("loadtest"), &changes).unwrap();
        file.save().unwrap();
        let entries = parse_keys_file(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(entries[1], changed);
        assert_eq!(changed.team.as_deref(), Some("bench"));
        assert_eq!(changed.models, ["sim"]);
        assert_eq!((changed.requests_per_minute, changed.tokens_per_minute), (Some(5), None));
        let text = fs::read_to_string(&path).unwrap();
        // The untouched entry and the comments are as they were.
        assert!(text.starts_with(&TWO_KEYS[..TWO_KEYS.find("# note about loadtest").unwrap()]), "{text}");
        assert!(text.contains("# note about loadtest\n[[keys]]\nid = \"loadtest\"\n"), "{text}");
        assert!(text.contains("requests_per_minute = 5 # inline comment\n"), "{text}");
    }

    #[test]
    fn inline_arrays_are_refused_and_an_empty_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let inline = format!("keys = [{{id = \"a\", prefix = \"lk_00000000\", sha256 = \"{}\"}}]\n", "0".repeat(64));
        let error = KeysFile::open(&file_with(&dir, &inline), false).unwrap_err();
        assert!(format!("{error}").contains("inline array"), "{error}");

        let path = file_with(&dir, "# nothing yet\nkeys = []\n");
        let mut file = KeysFile::open(&path, false).unwrap();
        file.add(generate_key("first").1).unwrap();
        file.save().unwrap();
        assert_eq!(ids(&path), ["first"]);
    }

    #[test]
    fn a_symbolic_link_is_followed_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let real = file_with(&dir, TWO_KEYS);
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let mut file = KeysFile::open(&link, false).unwrap();
        file.remove(by_id("demo")).unwrap();
        file.save().unwrap();
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(ids(&real), ["loadtest"]);
    }

    #[test]
    fn entry_text_is_one_keys_table() {
        let (_, mut entry) = generate_key("solo");
        entry.models = vec!["sim".into()];
        let text = entry_text(&entry);
        assert!(text.starts_with("[[keys]]\nid = \"solo\"\nprefix = "), "{text}");
        assert_eq!(parse_keys_file(&text).unwrap(), [entry]);
    }

    #[test]
    fn readers_never_see_a_half_written_file() {
        // A reader reads the file as fast as it can while entries are added one by one: each read
        // parses, and the count never goes down. Writing in place (truncate, then write) would let
        // the reader see an empty or cut file.
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(&dir, &TWO_KEYS.replace("# trailing note\n", &"# padding\n".repeat(2000)));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (path, done) = (path.clone(), done.clone());
            std::thread::spawn(move || {
                let (mut reads, mut last) = (0u32, 0usize);
                while !done.load(std::sync::atomic::Ordering::Relaxed) && reads < 1_000_000 {
                    let text = fs::read_to_string(&path).unwrap();
                    let count = parse_keys_file(&text).map(|keys| keys.len()).unwrap_or(0);
                    assert!(count >= last.max(2), "read {} entries after {last} ({} bytes)", count, text.len());
                    last = count;
                    reads += 1;
                }
                reads
            })
        };
        for n in 0..40 {
            let mut file = KeysFile::open(&path, false).unwrap();
            file.add(generate_key(&format!("key-{n}")).1).unwrap();
            file.save().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let reads = reader.join().unwrap();
        assert!(reads > 0);
        assert_eq!(ids(&path).len(), 42);
    }
}
