# A private apt configuration under one folder: its own sources.list, state, lists and
# cache, so that apt-get can update and download without touching the system's setup.
# Source this file, write "$root/etc/sources.list", then call `private_apt_setup ROOT` and
# use "${apt_opts[@]}" with apt-get and apt-cache.

# private_apt_setup ROOT: makes ROOT's folders and an empty status file, and sets the array
# apt_opts to the options that point apt there (downloads as root when we are root).
private_apt_setup() {
    local root="$1"
    mkdir -p "$root"/{lists/partial,cache/archives/partial,etc/apt.conf.d,etc/preferences.d,etc/sources.list.d}
    : > "$root/status"
    apt_opts=(
        -o "Dir::Etc=$root/etc"
        -o "Dir::Etc::sourcelist=$root/etc/sources.list"
        -o "Dir::Etc::sourceparts=$root/etc/sources.list.d"
        -o "Dir::Etc::preferences=$root/etc/preferences"
        -o "Dir::Etc::preferencesparts=$root/etc/preferences.d"
        -o "Dir::State=$root"
        -o "Dir::State::lists=$root/lists"
        -o "Dir::State::status=$root/status"
        -o "Dir::Cache=$root/cache"
        -o "Debug::NoLocking=1"
        -o "Acquire::Retries=3"
    )
    # Downloads are done by the _apt user when we are root; it must be able to write there.
    if [ "$(id -u)" = 0 ]; then apt_opts+=(-o "APT::Sandbox::User=root"); fi
}
