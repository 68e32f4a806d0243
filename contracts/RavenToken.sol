// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Permit.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// @title RavenToken
/// @notice RAVEN, the ERC-20 that stakes, deposits and payouts are denominated in. EIP-2612
/// `permit` lets a node stake or open a job in one transaction.
/// @dev Only the owner (the deployer) mints: devnets and tests mint freely, a production
/// deployment mints once and renounces ownership.
contract RavenToken is ERC20, ERC20Permit, Ownable {
    constructor() ERC20("Raven", "RAVEN") ERC20Permit("Raven") Ownable(msg.sender) {}

    /// @notice Creates `amount` base units for `to`.
    function mint(address to, uint256 amount) external onlyOwner {
        _mint(to, amount);
    }
}
