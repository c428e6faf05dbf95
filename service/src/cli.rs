//! Shell completions and man pages, generated from a program's own clap
//! definitions so they never drift from `--help`: `<program> completions
//! <SHELL>` prints a completion script, `<program> manpages <DIR>` writes
//! `<program>.1` and one `<program>-<subcommand>.1` per subcommand (nested
//! ones too: `kiwi-controller-token-create.1`). The packages ship both.

use anyhow::Context;
use clap::{Args, Command};
use clap_complete::Shell;
use std::path::{Path, PathBuf};

/// The arguments of the `completions` subcommand.
#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// The shell to print a completion script for.
    #[arg(value_name = "SHELL")]
    pub shell: Shell,
}

/// The arguments of the `manpages` subcommand.
#[derive(Debug, Clone, Args)]
pub struct ManpagesArgs {
    /// Directory to write the man pages (section 1) into; created if
    /// missing.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

/// Prints the completion script of `cmd` for `shell` on stdout.
pub fn print_completions(mut cmd: Command, shell: Shell) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
}

/// The `manpages` subcommand: writes them, says how many, and gives the
/// exit code (1 if they could not be written).
pub fn manpages_command(cmd: Command, dir: &Path) -> std::process::ExitCode {
    let program = cmd.get_name().to_string();
    match write_manpages(cmd, dir) {
        Ok(written) => {
            println!("{} man pages written to {}", written.len(), dir.display());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{program}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Writes the man pages of `cmd` and of every subcommand into `dir` and
/// returns the files written.
pub fn write_manpages(cmd: Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = cmd;
    cmd.build();
    let mut written = Vec::new();
    write_page(&cmd, cmd.get_name(), dir, &mut written)?;
    Ok(written)
}

fn write_page(
    cmd: &Command,
    name: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    // The page's title is its file name (`kiwi-controller-token-create`).
    let page = cmd.clone().name(name.to_string());
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .with_context(|| format!("cannot render the man page of {name}"))?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, out).with_context(|| format!("cannot write {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        write_page(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Parser, Subcommand};

    #[derive(Debug, Parser)]
    #[command(name = "demo", about = "A demo program")]
    struct Cli {
        #[command(subcommand)]
        command: Sub,
    }

    #[derive(Debug, Subcommand)]
    enum Sub {
        /// Runs it.
        Run {
            /// How fast.
            #[arg(long)]
            speed: Option<u32>,
        },
        /// Tokens.
        #[command(subcommand)]
        Token(TokenSub),
    }

    #[derive(Debug, Subcommand)]
    enum TokenSub {
        /// Makes one.
        Create,
    }

    #[test]
    fn a_page_per_command_and_subcommand_with_their_help() {
        use clap::CommandFactory;
        let dir = tempfile::tempdir().unwrap();
        let written = write_manpages(Cli::command(), dir.path()).unwrap();
        let mut names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "demo-run.1",
                "demo-token-create.1",
                "demo-token.1",
                "demo.1"
            ]
        );
        let run = std::fs::read_to_string(dir.path().join("demo-run.1")).unwrap();
        assert!(run.contains("demo\\-run"), "{run}");
        assert!(run.contains("How fast"), "{run}");
    }
}
