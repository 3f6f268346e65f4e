# bash completion for agentctl (agentctl-swarm). Install: copy to
# /usr/share/bash-completion/completions/agentctl or source it from ~/.bashrc.
_agentctl() {
    local cur prev words cword
    _init_completion 2>/dev/null || { cur=${COMP_WORDS[COMP_CWORD]}; prev=${COMP_WORDS[COMP_CWORD-1]}; words=("${COMP_WORDS[@]}"); cword=$COMP_CWORD; }
    case $cword in
        1) COMPREPLY=($(compgen -W "swarm task -h --help" -- "$cur")); return ;;
        2) case ${words[1]} in
               swarm) COMPREPLY=($(compgen -W "start stop status scale logs reload install-unit check-config" -- "$cur")) ;;
               task) COMPREPLY=($(compgen -W "add list cancel" -- "$cur")) ;;
           esac; return ;;
    esac
    case $prev in
        --config) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --role) COMPREPLY=($(compgen -W "builder auditor qa general any" -- "$cur")); return ;;
    esac
    case "${words[1]} ${words[2]}" in
        "swarm start") COMPREPLY=($(compgen -W "--count --config" -- "$cur")) ;;
        "swarm status"|"task list") COMPREPLY=($(compgen -W "--json" -- "$cur")) ;;
        "swarm stop") COMPREPLY=($(compgen -W "--no-wait" -- "$cur")) ;;
        "swarm logs")
            local agents
            agents=$(agentctl swarm status --json 2>/dev/null | python3 -c 'import json,sys; print(" ".join(a["name"] for a in json.load(sys.stdin)["agents"]))' 2>/dev/null)
            COMPREPLY=($(compgen -W "-f --follow $agents" -- "$cur")) ;;
        "swarm install-unit") COMPREPLY=($(compgen -W "--force" -- "$cur")) ;;
        "swarm check-config") COMPREPLY=($(compgen -W "--config" -- "$cur")) ;;
        "task add") COMPREPLY=($(compgen -W "--role --id --json" -- "$cur")) ;;
        "task cancel")
            local ids
            ids=$(agentctl task list --json 2>/dev/null | python3 -c 'import json,sys; print(" ".join(t["id"] for t in json.load(sys.stdin) if t["state"] not in ("done","failed","blocked","cancelled")))' 2>/dev/null)
            COMPREPLY=($(compgen -W "$ids" -- "$cur")) ;;
    esac
}
complete -F _agentctl agentctl
