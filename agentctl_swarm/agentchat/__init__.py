"""agentchat: identities, the wire protocol, the client and the embedded relay.

Submodules are imported lazily by their users (``from agentctl_swarm.agentchat.client
import AgentChatClient``) so that importing the package costs nothing.
"""
